"""A seeded synthetic population of instances with identities and heart-rate measurements."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta
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


@dataclass
class Population:
    """Instances as parallel numpy arrays, and their measurements as (owner, day, bpm) arrays.

    ``hr_owner`` indexes into the instance arrays. Days count from 1970-01-01.
    """

    instance_ids: list[str]
    birth_days: npt.NDArray[np.int64]
    female: npt.NDArray[np.bool_]
    consent: npt.NDArray[np.bool_]
    hr_owner: npt.NDArray[np.int64]
    hr_day: npt.NDArray[np.int64]
    hr_bpm: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        n = len(self.instance_ids)
        if not len(self.birth_days) == len(self.female) == len(self.consent) == n:
            raise DispersError(ErrorCode.MALFORMED, "instance columns have different lengths")
        if not len(self.hr_owner) == len(self.hr_day) == len(self.hr_bpm):
            raise DispersError(ErrorCode.MALFORMED, "measurement columns have different lengths")
        if len(self.hr_owner) and (self.hr_owner.min() < 0 or self.hr_owner.max() >= n):
            raise DispersError(ErrorCode.MALFORMED, "hr_owner points outside the instances")

    @property
    def n_instances(self) -> int:
        """The number of instances."""
        return len(self.instance_ids)

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

    def write(self, store: DocumentStore) -> None:
        """Bulk-load the instances and their measurements into ``store``."""
        store.add_instances(
            self.instance_ids,
            self.birth_days,
            ["F" if f else "M" for f in self.female.tolist()],
            self.consent,
        )
        owners = np.asarray(self.instance_ids, dtype=object)[self.hr_owner].tolist()
        store.add_heart_rates(owners, self.hr_day, self.hr_bpm)
        logger.info(
            "wrote %d instances and %d heart-rate measurements",
            self.n_instances,
            len(self.hr_owner),
        )


def generate(spec: PopulationSpec) -> Population:
    """Generate a population from ``spec``; the same spec always gives the same population."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n_instances
    as_of_day = (spec.as_of - _EPOCH).days

    age_days = rng.uniform(_MIN_AGE_YEARS, _MAX_AGE_YEARS, n) * _DAYS_PER_YEAR
    birth_days = (as_of_day - np.floor(age_days)).astype(np.int64)
    female = rng.random(n) < 0.5
    consent = rng.random(n) >= spec.decline_rate

    # Resting heart rate: higher in children, slightly higher in women, a personal offset.
    age_years = age_days / _DAYS_PER_YEAR
    baseline = (
        68.0 + 3.0 * female + 14.0 * np.exp(-(age_years - _MIN_AGE_YEARS) / 8.0) + rng.normal(0.0, 4.0, n)
    )
    baseline = np.clip(baseline, 55.0, 95.0)

    # Activity varies between people (exponential rate), so some have no recent measurement.
    rate = _MEASUREMENTS_PER_DAY * spec.history_days * rng.exponential(1.0, n)
    counts = rng.poisson(rate)
    hr_owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    m = len(hr_owner)
    hr_day = (as_of_day - rng.integers(0, spec.history_days, m)).astype(np.int64)
    hr_bpm = np.clip(baseline[hr_owner] + rng.normal(0.0, _NOISE_SD, m), *_BPM_RANGE)

    ids = [f"{spec.host}-i{k:07d}" for k in range(n)]
    logger.debug("generated %d instances and %d measurements (seed %d)", n, m, spec.seed)
    return Population(
        instance_ids=ids,
        birth_days=birth_days,
        female=female,
        consent=consent,
        hr_owner=hr_owner,
        hr_day=hr_day,
        hr_bpm=hr_bpm.astype(np.float64),
    )


def concat(*parts: Population) -> Population:
    """One population made of several (ids must not collide)."""
    offsets = np.cumsum([0] + [p.n_instances for p in parts[:-1]])
    ids = [i for p in parts for i in p.instance_ids]
    if len(set(ids)) != len(ids):
        raise DispersError(ErrorCode.MALFORMED, "populations share instance ids")
    return Population(
        instance_ids=ids,
        birth_days=np.concatenate([p.birth_days for p in parts]),
        female=np.concatenate([p.female for p in parts]),
        consent=np.concatenate([p.consent for p in parts]),
        hr_owner=np.concatenate([p.hr_owner + off for p, off in zip(parts, offsets, strict=True)]),
        hr_day=np.concatenate([p.hr_day for p in parts]),
        hr_bpm=np.concatenate([p.hr_bpm for p in parts]),
    )
