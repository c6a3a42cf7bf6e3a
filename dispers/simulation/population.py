"""A seeded synthetic population: identities and correlated heart-rate, steps, sleep and weight series.

Each instance has a birth date (age uniform in 5-95 years), a sex, a consent flag and, for each
measurement kind, a personal level around which its daily values vary:

- steps a day: the level's mean falls with age (10,500 at 5, 9,000 at 30, 5,000 at 80), a
  lognormal personal factor (sigma 0.35) and lognormal day-to-day variation (sigma 0.35)
  that keeps the mean; recorded by three people in four, on 40-90% of days;
- sleep hours a night: 7.2 at 45, 0.1 less per decade of age, sd 0.45 between people and 0.65
  night to night (about 7.2 +- 0.8 overall); recorded by two people in five, on 50-90% of nights;
- weight in kg: adults about 68 (F) or 82 (M), slightly more in middle age and less after 70,
  children on a growth curve (about 20 kg at 5), a lognormal personal factor (sigma 0.15)
  slightly higher for people who walk less; weighed by three people in five, on 3-30% of days,
  within 0.5 kg of their level;
- heart rate in bpm: a resting level that follows a **known linear relation** to the weight and
  steps levels, for testing regression::

      level = HR_MODEL["intercept"]
              + HR_MODEL["weight_kg"] * (weight_kg - HR_MODEL_CENTRES["weight_kg"])
              + HR_MODEL["steps"] * (steps - HR_MODEL_CENTRES["steps"])
              + Normal(0, HR_MODEL["sigma"])

  that is 70 + 0.25 (weight - 75) - 0.0004 (steps - 7000) + N(0, 3), with no other term (no
  age or sex effect, so regressing on weight and steps alone is unbiased; children, lighter,
  come out with a lower rate than real ones would). Measurements scatter around the level
  (sd 8, clipped to 35-200 bpm) about 3 times per 10 days, a rate that varies between people
  so some have none recently. The mean heart rate over 30 days thus reflects the relation,
  with extra noise of 8 / sqrt(count).

The intercept is 70, not 60, so that the mean rates per adult age bracket stay near what they
were before this relation (about 70 bpm); the slopes and sigma are as specified.

Identities, heart-rate days and counts are drawn from ``seed`` as in earlier versions; the new
kinds come from a child stream of the same seed, so they do not shift the older draws.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode

if TYPE_CHECKING:
    from dispers.state.documents import DocumentStore

logger = logging.getLogger(__name__)

_EPOCH = date(1970, 1, 1)
_DAYS_PER_YEAR = 365.2425
_MIN_AGE_YEARS = 5.0
_MAX_AGE_YEARS = 95.0
_MEASUREMENTS_PER_DAY = 0.3  # about 3 per 10 days on average
_NOISE_SD = 8.0
_BPM_RANGE = (35.0, 200.0)
_OLD_PERSON_SD = 4.0  # the personal offset's sd before HR_MODEL: its draw is rescaled to sigma

MEASURED_KINDS: tuple[str, ...] = ("heart_rate", "steps", "sleep_hours", "weight_kg")
"""The measurement kinds a Population holds, in the order ``write`` stores them."""

HR_MODEL: Mapping[str, float] = MappingProxyType(
    {"intercept": 70.0, "weight_kg": 0.25, "steps": -0.0004, "sigma": 3.0}
)
"""Heart-rate level = intercept + weight_kg * (weight - 75) + steps * (steps - 7000) + N(0, sigma)."""

HR_MODEL_CENTRES: Mapping[str, float] = MappingProxyType({"weight_kg": 75.0, "steps": 7000.0})
"""The values HR_MODEL's slopes are centred on: the intercept is the rate at these levels."""

# Steps: mean level by age (knots), between-person and day-to-day lognormal sigmas.
_STEPS_AGES = (5.0, 15.0, 30.0, 80.0, 95.0)
_STEPS_MEANS = (10_500.0, 10_000.0, 9_000.0, 5_000.0, 3_800.0)
_STEPS_PERSON_SIGMA = 0.35
_STEPS_DAY_SIGMA = 0.35
# Weight: adult means by sex, a growth curve (fraction of the adult weight) for children.
_WEIGHT_ADULT = {"F": 68.0, "M": 82.0}
_GROWTH_AGES = (5.0, 8.0, 11.0, 14.0, 17.0, 20.0)
_GROWTH_FRACTION = (0.27, 0.36, 0.50, 0.70, 0.88, 1.0)
_WEIGHT_PERSON_SIGMA = 0.15
_WEIGHT_STEPS_LOADING = -0.04  # who walks less weighs a little more
_WEIGHT_DAY_SD = 0.5
# Sleep: 7.2 h at 45, 0.01 h less a year; between-person and night-to-night sd.
_SLEEP_AT_45 = 7.2
_SLEEP_PER_YEAR = -0.01
_SLEEP_PERSON_SD = 0.45
_SLEEP_NIGHT_SD = 0.65
# Who records a daily kind (share of people), and on which fraction of days (uniform range).
_RECORDING = {
    "steps": (0.75, 0.4, 0.9),
    "sleep_hours": (0.4, 0.5, 0.9),
    "weight_kg": (0.6, 0.03, 0.3),
}
_CELLS_PER_BLOCK = 1 << 21  # people x days drawn at once, to bound memory on large populations


@dataclass(frozen=True)
class PopulationSpec:
    """How many instances to make, from which seed, and over which history."""

    n_instances: int = 10_000
    seed: int = 7
    as_of: date = date(2026, 11, 1)
    history_days: int = 90
    decline_rate: float = 0.03
    host: str = "pc-1"

    def __post_init__(self) -> None:
        if self.n_instances < 1:
            raise DispersError(ErrorCode.CONFIG, "n_instances must be at least 1")
        if not 0.0 <= self.decline_rate < 1.0:
            raise DispersError(ErrorCode.CONFIG, "decline_rate must be in [0, 1)")
        if self.history_days < 1:
            raise DispersError(ErrorCode.CONFIG, "history_days must be at least 1")
        if not self.host:
            raise DispersError(ErrorCode.CONFIG, "host must not be empty")


def _int64(values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class Series:
    """Measurements of one kind as parallel arrays: owner (an instance index), day, value.

    Days count from 1970-01-01.
    """

    owner: npt.NDArray[np.int64]
    day: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        if not len(self.owner) == len(self.day) == len(self.value):
            raise DispersError(ErrorCode.MALFORMED, "measurement columns have different lengths")

    @classmethod
    def empty(cls) -> Series:
        """A series without measurements."""
        return cls(_int64([]), _int64([]), np.zeros(0, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.owner)


@dataclass
class Population:
    """Instances as parallel numpy arrays, and their measurements as one series per kind.

    Heart rate keeps its (owner, day, bpm) arrays ``hr_owner``, ``hr_day``, ``hr_bpm``; the
    other kinds are :class:`Series`, empty unless given. ``hr_owner`` and every series' owner
    index into the instance arrays. Days count from 1970-01-01. ``levels`` holds, per kind,
    each instance's personal level that its values vary around (as generated; may be empty).
    """

    instance_ids: list[str]
    birth_days: npt.NDArray[np.int64]
    female: npt.NDArray[np.bool_]
    consent: npt.NDArray[np.bool_]
    hr_owner: npt.NDArray[np.int64]
    hr_day: npt.NDArray[np.int64]
    hr_bpm: npt.NDArray[np.float64]
    steps: Series = field(default_factory=Series.empty)
    sleep_hours: Series = field(default_factory=Series.empty)
    weight_kg: Series = field(default_factory=Series.empty)
    levels: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.instance_ids)
        if not len(self.birth_days) == len(self.female) == len(self.consent) == n:
            raise DispersError(ErrorCode.MALFORMED, "instance columns have different lengths")
        if not len(self.hr_owner) == len(self.hr_day) == len(self.hr_bpm):
            raise DispersError(ErrorCode.MALFORMED, "measurement columns have different lengths")
        for kind in MEASURED_KINDS:
            owner = self.series(kind).owner
            if len(owner) and (owner.min() < 0 or owner.max() >= n):
                what = "hr_owner" if kind == "heart_rate" else f"{kind} owner"
                raise DispersError(ErrorCode.MALFORMED, f"{what} points outside the instances")
        for kind, level in self.levels.items():
            if kind not in MEASURED_KINDS or len(level) != n:
                raise DispersError(ErrorCode.MALFORMED, f"levels[{kind!r}] is not one value per instance")

    @property
    def n_instances(self) -> int:
        """The number of instances."""
        return len(self.instance_ids)

    def series(self, kind: str) -> Series:
        """The measurements of ``kind`` (one of MEASURED_KINDS), else NOT_FOUND."""
        if kind == "heart_rate":
            return Series(self.hr_owner, self.hr_day, self.hr_bpm)
        if kind in MEASURED_KINDS:
            found: Series = getattr(self, kind)
            return found
        raise DispersError(ErrorCode.NOT_FOUND, f"no measurement kind {kind[:64]!r} in a population")

    def ages_at(self, as_of: date) -> npt.NDArray[np.int64]:
        """Return each person's calendar age in whole years on ``as_of``.

        Computed with :mod:`datetime` once per distinct birth day (at most a few tens of
        thousands), so it stays an independent reference for vectorised age code elsewhere.
        """
        days, inverse = np.unique(self.birth_days, return_inverse=True)
        ages = np.empty(len(days), dtype=np.int64)
        for k, d in enumerate(days.tolist()):
            born = _EPOCH + timedelta(days=d)
            before_birthday = (as_of.month, as_of.day) < (born.month, born.day)
            ages[k] = as_of.year - born.year - int(before_birthday)
        result: npt.NDArray[np.int64] = ages[inverse.reshape(-1)]
        return result

    def write(self, store: DocumentStore, *, on_rows: Callable[[int], None] | None = None) -> None:
        """Bulk-load the instances and their measurements into ``store`` (a transaction per kind).

        ``on_rows`` is told how many rows each transaction wrote (a progress bar's update).
        """
        store.add_instances(
            self.instance_ids,
            self.birth_days,
            ["F" if f else "M" for f in self.female.tolist()],
            self.consent,
        )
        if on_rows is not None:
            on_rows(self.n_instances)
        ids = np.asarray(self.instance_ids, dtype=object)
        written = {}
        for kind in MEASURED_KINDS:
            series = self.series(kind)
            if len(series):
                store.add_measurements(kind, ids[series.owner].tolist(), series.day, series.value)
            written[kind] = len(series)
            if on_rows is not None:
                on_rows(len(series))
        logger.info("wrote %d instances and measurements %s", self.n_instances, written)


def _recording_days(
    rng: np.random.Generator, n: int, as_of_day: int, history_days: int, kind: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(owner, day) of the days on which each person records ``kind``: at most one a day.

    A share of people record at all, each on a personal fraction of days. Drawn in blocks of
    people so that memory stays bounded; owners come out sorted, days descending.
    """
    share, low, high = _RECORDING[kind]
    records = rng.random(n) < share
    p = np.where(records, rng.uniform(low, high, n), 0.0)
    block = max(1, _CELLS_PER_BLOCK // history_days)
    owners, days = [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        mask = rng.random((stop - start, history_days)) < p[start:stop, None]
        who, back = np.nonzero(mask)
        owners.append(who.astype(np.int64) + start)
        days.append((as_of_day - back).astype(np.int64))
    return np.concatenate(owners), np.concatenate(days)


def _levels(
    rng: np.random.Generator, age_years: npt.NDArray[np.float64], female: npt.NDArray[np.bool_]
) -> dict[str, npt.NDArray[np.float64]]:
    """Each person's steps, weight and sleep levels (heart rate follows from HR_MODEL)."""
    n = len(age_years)
    z_steps = rng.standard_normal(n)
    z_weight = rng.standard_normal(n)
    z_sleep = rng.standard_normal(n)

    sigma = _STEPS_PERSON_SIGMA
    steps = np.interp(age_years, _STEPS_AGES, _STEPS_MEANS) * np.exp(sigma * z_steps - sigma**2 / 2)

    adult = np.where(female, _WEIGHT_ADULT["F"], _WEIGHT_ADULT["M"])
    adult = adult + 0.1 * (np.clip(age_years, 20.0, 60.0) - 40.0) - 0.15 * np.maximum(age_years - 70.0, 0.0)
    growth = np.interp(age_years, _GROWTH_AGES, _GROWTH_FRACTION)
    log_sd2 = _WEIGHT_PERSON_SIGMA**2 + _WEIGHT_STEPS_LOADING**2
    factor = np.exp(_WEIGHT_PERSON_SIGMA * z_weight + _WEIGHT_STEPS_LOADING * z_steps - log_sd2 / 2)
    weight = adult * growth * factor

    sleep = _SLEEP_AT_45 + _SLEEP_PER_YEAR * (age_years - 45.0) + _SLEEP_PERSON_SD * z_sleep
    return {"steps": steps, "weight_kg": weight, "sleep_hours": sleep}


def _daily_series(
    rng: np.random.Generator,
    levels: Mapping[str, npt.NDArray[np.float64]],
    as_of_day: int,
    history_days: int,
) -> dict[str, Series]:
    """Steps, sleep and weight series scattered around each person's level."""
    n = len(levels["steps"])
    out: dict[str, Series] = {}

    owner, day = _recording_days(rng, n, as_of_day, history_days, "steps")
    s = _STEPS_DAY_SIGMA
    walked = levels["steps"][owner] * np.exp(s * rng.standard_normal(len(owner)) - s**2 / 2)
    out["steps"] = Series(owner, day, np.clip(np.round(walked), 0.0, 100_000.0))

    owner, day = _recording_days(rng, n, as_of_day, history_days, "sleep_hours")
    slept = levels["sleep_hours"][owner] + rng.normal(0.0, _SLEEP_NIGHT_SD, len(owner))
    out["sleep_hours"] = Series(owner, day, np.round(np.clip(slept, 2.0, 14.0), 2).astype(np.float64))

    owner, day = _recording_days(rng, n, as_of_day, history_days, "weight_kg")
    weighed = levels["weight_kg"][owner] + rng.normal(0.0, _WEIGHT_DAY_SD, len(owner))
    out["weight_kg"] = Series(owner, day, np.round(np.clip(weighed, 2.0, 400.0), 1).astype(np.float64))
    return out


def generate(spec: PopulationSpec) -> Population:
    """Generate a population from ``spec``; the same spec always gives the same population."""
    rng = np.random.default_rng(spec.seed)
    # A child stream for the kinds added after heart rate: the draws above stay as they were.
    more = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(1)[0])
    n = spec.n_instances
    as_of_day = (spec.as_of - _EPOCH).days

    age_days = rng.uniform(_MIN_AGE_YEARS, _MAX_AGE_YEARS, n) * _DAYS_PER_YEAR
    birth_days = (as_of_day - np.floor(age_days)).astype(np.int64)
    female = rng.random(n) < 0.5
    consent = rng.random(n) >= spec.decline_rate
    age_years = age_days / _DAYS_PER_YEAR

    levels = _levels(more, age_years, female)
    person = rng.normal(0.0, _OLD_PERSON_SD, n) * (HR_MODEL["sigma"] / _OLD_PERSON_SD)
    levels["heart_rate"] = (
        HR_MODEL["intercept"]
        + HR_MODEL["weight_kg"] * (levels["weight_kg"] - HR_MODEL_CENTRES["weight_kg"])
        + HR_MODEL["steps"] * (levels["steps"] - HR_MODEL_CENTRES["steps"])
        + person
    )

    # Activity varies between people (exponential rate), so some have no recent measurement.
    rate = _MEASUREMENTS_PER_DAY * spec.history_days * rng.exponential(1.0, n)
    counts = rng.poisson(rate)
    hr_owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    m = len(hr_owner)
    hr_day = (as_of_day - rng.integers(0, spec.history_days, m)).astype(np.int64)
    hr_bpm = np.clip(levels["heart_rate"][hr_owner] + rng.normal(0.0, _NOISE_SD, m), *_BPM_RANGE)

    daily = _daily_series(more, levels, as_of_day, spec.history_days)
    ids = [f"{spec.host}-i{k:07d}" for k in range(n)]
    logger.debug(
        "generated %d instances, %d heart-rate measurements and %d others (seed %d)",
        n,
        m,
        sum(len(s) for s in daily.values()),
        spec.seed,
    )
    return Population(
        instance_ids=ids,
        birth_days=birth_days,
        female=female,
        consent=consent,
        hr_owner=hr_owner,
        hr_day=hr_day,
        hr_bpm=hr_bpm.astype(np.float64),
        steps=daily["steps"],
        sleep_hours=daily["sleep_hours"],
        weight_kg=daily["weight_kg"],
        levels=levels,
    )


def concat(*parts: Population) -> Population:
    """One population made of several (ids must not collide).

    A kind's levels are kept only when every part has them.
    """
    offsets = np.cumsum([0] + [p.n_instances for p in parts[:-1]])
    ids = [i for p in parts for i in p.instance_ids]
    if len(set(ids)) != len(ids):
        raise DispersError(ErrorCode.MALFORMED, "populations share instance ids")

    def joined(kind: str) -> Series:
        series = [p.series(kind) for p in parts]
        return Series(
            np.concatenate([s.owner + off for s, off in zip(series, offsets, strict=True)]),
            np.concatenate([s.day for s in series]),
            np.concatenate([s.value for s in series]),
        )

    heart = joined("heart_rate")
    shared = [k for k in MEASURED_KINDS if all(k in p.levels for p in parts)]
    return Population(
        instance_ids=ids,
        birth_days=np.concatenate([p.birth_days for p in parts]),
        female=np.concatenate([p.female for p in parts]),
        consent=np.concatenate([p.consent for p in parts]),
        hr_owner=heart.owner,
        hr_day=heart.day,
        hr_bpm=heart.value,
        steps=joined("steps"),
        sleep_hours=joined("sleep_hours"),
        weight_kg=joined("weight_kg"),
        levels={k: np.concatenate([p.levels[k] for p in parts]) for k in shared},
    )
