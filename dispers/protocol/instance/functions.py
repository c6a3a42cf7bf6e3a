"""The registries of local functions and group-by fields an instance computes contributions with.

Local functions, each registered with its parameters and natural bounds (see
:func:`describe_functions`):

- ``mean_<kind>``, ``count_<kind>``, ``sum_<kind>`` over the last ``window_days`` days up to
  ``as_of`` (as_of - window_days < day <= as_of), and ``latest_<kind>``, the mean of the values
  of the most recent day with a measurement at most ``max_age_days`` days before ``as_of``,
  for every measurement kind of :data:`dispers.state.documents.MEASUREMENT_KINDS`;
- ``age``, whole years at ``as_of`` from the birth date.

Group-by fields (see :func:`describe_fields`): ``age`` in years, and ``sex`` coded by
:data:`SEX_CODES` (F as 0, M as 1; edges ``SEX_EDGES`` = [0, 1, 2] make one group per sex).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.documents import MEASUREMENT_KINDS, Documents, MeasurementKind, epoch_day

logger = logging.getLogger(__name__)

_MAX_NAME_IN_ERROR = 64


class LocalFunction(Protocol):
    """Computes one value per instance of a batch from the instances' own documents.

    Returns (values, has_value); values are NaN where has_value is False.
    """

    def __call__(
        self,
        store: Documents,
        ids: Sequence[str],
        params: Mapping[str, object],
        as_of: date,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]: ...


FieldFunction = Callable[[Documents, Sequence[str], date], npt.NDArray[np.float64]]


@dataclass(frozen=True)
class IntParam:
    """An integer parameter of a local function: its default and inclusive range."""

    default: int
    lo: int
    hi: int


@dataclass(frozen=True)
class LocalValues:
    """One batch's local values: ``ok`` says which instances contribute, ``groups`` where.

    ``groups`` is -1 for an instance outside every group.
    """

    values: npt.NDArray[np.float64]
    groups: npt.NDArray[np.int64]
    ok: npt.NDArray[np.bool_]


BoundsRule = Callable[[Mapping[str, int]], tuple[float, float]]


@dataclass(frozen=True)
class FunctionInfo:
    """What a registered local function computes, for listings and for checking a query's bounds.

    ``lower`` and ``upper`` are its natural bounds with default parameters: every value it
    returns lies within them (for ``age``, of anyone younger than 151). Counts and sums grow
    with their window: :meth:`bounds` gives them for other parameters.
    """

    name: str
    kind: str | None  # the measurement kind it reads; None for a function of the identity
    statistic: str  # mean, latest, count, sum, or value (a single value such as age)
    unit: str
    summary: str  # one line
    params: Mapping[str, IntParam]
    lower: float
    upper: float

    def bounds(self, params: Mapping[str, object] | None = None) -> tuple[float, float]:
        """Natural (lower, upper) bounds with ``params`` (validated, defaults filled in)."""
        return natural_bounds(self.name, {} if params is None else params)


@dataclass(frozen=True)
class FieldInfo:
    """A group-by field: what it is, its unit, and its categories when it codes some."""

    name: str
    unit: str
    summary: str
    categories: Mapping[str, int] = field(default_factory=dict)  # label -> code


FUNCTIONS: dict[str, LocalFunction] = {}
FIELDS: dict[str, FieldFunction] = {}
_PARAMS: dict[str, Mapping[str, IntParam]] = {}
_INFO: dict[str, tuple[str | None, str, str, str]] = {}  # name -> kind, statistic, unit, summary
_BOUNDS: dict[str, BoundsRule] = {}
_FIELD_INFO: dict[str, FieldInfo] = {}

SEX_CODES: Mapping[str, int] = MappingProxyType({"F": 0, "M": 1})
"""How the ``sex`` field codes each category (the store holds 'F' or 'M')."""
SEX_EDGES: tuple[float, ...] = (0.0, 1.0, 2.0)
"""Edges that group by sex: group 0 is F, group 1 is M."""

_UNBOUNDED: tuple[float, float] = (-math.inf, math.inf)


def _shown(name: str) -> str:
    return repr(name[:_MAX_NAME_IN_ERROR])


def get_function(name: str) -> LocalFunction:
    """Return the registered local function ``name``, or raise NOT_FOUND."""
    try:
        return FUNCTIONS[name]
    except (KeyError, TypeError):
        raise DispersError(ErrorCode.NOT_FOUND, f"unknown local function {_shown(str(name))}") from None


def validate_params(name: str, params: Mapping[str, object]) -> dict[str, object]:
    """Check ``params`` against the parameters of function ``name``; return them with defaults.

    Unknown function: NOT_FOUND. Unknown parameter, wrong type or out of range: MALFORMED,
    naming the parameter.
    """
    get_function(name)
    spec = _PARAMS[name]
    if not isinstance(params, Mapping):
        raise DispersError(ErrorCode.MALFORMED, f"{name}: params must be a mapping")
    for key in params:
        if key not in spec:
            shown = _shown(key) if isinstance(key, str) else "of a non-string name"
            raise DispersError(ErrorCode.MALFORMED, f"{name}: unknown parameter {shown}")
    checked: dict[str, object] = {}
    for key, param in spec.items():
        value = params.get(key, param.default)
        # bool is an int subclass, but True is not a number of days.
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise DispersError(ErrorCode.MALFORMED, f"{name}: parameter {key!r} must be an integer")
        if not param.lo <= value <= param.hi:
            raise DispersError(
                ErrorCode.MALFORMED,
                f"{name}: parameter {key!r} must be in [{param.lo}, {param.hi}]",
            )
        checked[key] = int(value)
    return checked


def natural_bounds(name: str, params: Mapping[str, object]) -> tuple[float, float]:
    """Natural (lower, upper) bounds of function ``name`` with ``params`` (validated first)."""
    checked = validate_params(name, params)
    rule = _BOUNDS.get(name)
    if rule is None:
        return _UNBOUNDED
    ints = {k: int(v) for k, v in checked.items() if isinstance(v, int)}
    return rule(ints)


def describe_functions() -> list[FunctionInfo]:
    """Every registered local function, sorted by name, with its parameters and natural bounds."""
    out = []
    for name in sorted(FUNCTIONS):
        kind, statistic, unit, summary = _INFO[name]
        lower, upper = natural_bounds(name, {})
        out.append(
            FunctionInfo(
                name=name,
                kind=kind,
                statistic=statistic,
                unit=unit,
                summary=summary,
                params=MappingProxyType(dict(_PARAMS[name])),
                lower=lower,
                upper=upper,
            )
        )
    return out


def describe_fields() -> list[FieldInfo]:
    """Every registered group-by field, sorted by name."""
    return [_FIELD_INFO[name] for name in sorted(FIELDS)]


def register(
    name: str,
    *,
    params: Mapping[str, IntParam] | None = None,
    kind: str | None = None,
    statistic: str = "value",
    unit: str = "",
    summary: str | None = None,
    bounds: BoundsRule | tuple[float, float] = _UNBOUNDED,
) -> Callable[[LocalFunction], LocalFunction]:
    """Register a local function under ``name``; its params are validated before each call.

    ``bounds`` are its natural bounds, fixed or as a function of the validated params;
    ``summary`` defaults to the first line of the function's docstring.
    """

    def decorate(fn: LocalFunction) -> LocalFunction:
        if name in FUNCTIONS:
            raise ValueError(f"local function {name!r} is registered twice")

        @functools.wraps(fn)
        def checked(
            store: Documents,
            ids: Sequence[str],
            params: Mapping[str, object],
            as_of: date,
        ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
            return fn(store, ids, validate_params(name, params), as_of)

        doc = (fn.__doc__ or "").strip().splitlines()
        FUNCTIONS[name] = checked
        _PARAMS[name] = dict(params or {})
        _INFO[name] = (kind, statistic, unit, summary if summary is not None else (doc[0] if doc else ""))
        if callable(bounds):
            _BOUNDS[name] = bounds
        else:
            fixed = (float(bounds[0]), float(bounds[1]))
            _BOUNDS[name] = lambda _params: fixed
        return checked

    return decorate


def register_field(
    name: str, *, unit: str = "", summary: str = "", categories: Mapping[str, int] | None = None
) -> Callable[[FieldFunction], FieldFunction]:
    """Register a group-by field under ``name``; ``categories`` maps labels to the codes it returns."""

    def decorate(fn: FieldFunction) -> FieldFunction:
        if name in FIELDS:
            raise ValueError(f"group-by field {name!r} is registered twice")
        FIELDS[name] = fn
        doc = (fn.__doc__ or "").strip().splitlines()
        _FIELD_INFO[name] = FieldInfo(
            name=name,
            unit=unit,
            summary=summary or (doc[0] if doc else ""),
            categories=MappingProxyType(dict(categories or {})),
        )
        return fn

    return decorate


def ages_at(birth_days: npt.NDArray[np.int64], as_of: date) -> npt.NDArray[np.int64]:
    """Calendar ages in whole years on ``as_of`` of people born on ``birth_days`` (epoch days).

    A birthday on 29 February counts as passed from 1 March in other years.
    """
    born = np.asarray(birth_days, dtype=np.int64).astype("datetime64[D]")
    year = born.astype("datetime64[Y]").astype(np.int64) + 1970
    month_start = born.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12 + 1
    day = (born - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    before_birthday = month * 100 + day > as_of.month * 100 + as_of.day
    ages: npt.NDArray[np.int64] = (as_of.year - year - before_birthday).astype(np.int64)
    return ages


def bucketize(field_values: npt.ArrayLike, edges: Sequence[float]) -> npt.NDArray[np.int64]:
    """Group index i of each value with edges[i] <= v < edges[i+1], or -1 outside (and NaN).

    ``edges`` must hold at least two strictly increasing numbers, else MALFORMED.
    """
    try:
        bounds = np.asarray(edges, dtype=np.float64)
    except (TypeError, ValueError):
        raise DispersError(ErrorCode.MALFORMED, "edges must be numbers") from None
    if bounds.ndim != 1 or len(bounds) < 2:
        raise DispersError(ErrorCode.MALFORMED, "edges must hold at least two numbers")
    if np.isnan(bounds).any() or not np.all(np.diff(bounds) > 0):
        raise DispersError(ErrorCode.MALFORMED, "edges must be strictly increasing")
    values = np.asarray(field_values, dtype=np.float64)
    groups = np.searchsorted(bounds, values, side="right").astype(np.int64) - 1
    outside = np.isnan(values) | (values < bounds[0]) | (values >= bounds[-1])
    groups[outside] = -1
    return groups


@register_field("age", unit="years")
def _age_field(store: Documents, ids: Sequence[str], as_of: date) -> npt.NDArray[np.float64]:
    """Age in whole years on as_of."""
    birth_days, _, _ = store.identity(ids)
    return ages_at(birth_days, as_of).astype(np.float64)


@register_field("sex", categories=SEX_CODES)
def _sex_field(store: Documents, ids: Sequence[str], as_of: date) -> npt.NDArray[np.float64]:
    """Sex as recorded, coded F = 0, M = 1 (group with edges [0, 1, 2])."""
    _, female, _ = store.identity(ids)
    return np.where(female, float(SEX_CODES["F"]), float(SEX_CODES["M"]))


def _int_param(params: Mapping[str, object], key: str) -> int:
    value = params[key]
    assert isinstance(value, int)  # validate_params made it so
    return value


_WINDOW = {"window_days": IntParam(default=30, lo=1, hi=3650)}
_MAX_AGE = {"max_age_days": IntParam(default=30, lo=0, hi=3650)}


def _value_bounds(kind: MeasurementKind) -> BoundsRule:
    return lambda _params: (kind.lo, kind.hi)


def _count_bounds(kind: MeasurementKind) -> BoundsRule:
    return lambda params: (0.0, float(kind.max_per_day * params["window_days"]))


def _sum_bounds(kind: MeasurementKind) -> BoundsRule:
    # A sum exists only with at least one value, and holds at most max_per_day a day.
    def rule(params: Mapping[str, int]) -> tuple[float, float]:
        most = kind.max_per_day * params["window_days"]
        return min(kind.lo, kind.lo * most), max(kind.hi, kind.hi * most)

    return rule


@register(
    "mean_heart_rate",
    params=_WINDOW,
    kind="heart_rate",
    statistic="mean",
    unit=MEASUREMENT_KINDS["heart_rate"].unit,
    bounds=_value_bounds(MEASUREMENT_KINDS["heart_rate"]),
)
def mean_heart_rate(
    store: Documents,
    ids: Sequence[str],
    params: Mapping[str, object],
    as_of: date,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Mean of the heart-rate measurements of the last ``window_days`` days up to ``as_of``."""
    end = epoch_day(as_of)
    count, mean = store.heart_rate_summary(ids, end - _int_param(params, "window_days"), end)
    return mean, count > 0


def _windowed(kind: str, statistic: str) -> LocalFunction:
    """The local function computing ``statistic`` (mean, count or sum) of ``kind`` over a window."""

    def compute(
        store: Documents,
        ids: Sequence[str],
        params: Mapping[str, object],
        as_of: date,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        end = epoch_day(as_of)
        count, total = store.measurement_totals(kind, ids, end - _int_param(params, "window_days"), end)
        has = count > 0
        if statistic == "count":  # no measurement is a count of 0: everyone has one
            return count.astype(np.float64), np.ones(len(ids), dtype=bool)
        if statistic == "sum":
            return np.where(has, total, np.nan), has
        return np.divide(total, count, out=np.full(len(ids), np.nan), where=has), has

    return compute


def _latest(kind: str) -> LocalFunction:
    """The local function giving the latest value of ``kind`` at most max_age_days old."""

    def compute(
        store: Documents,
        ids: Sequence[str],
        params: Mapping[str, object],
        as_of: date,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        end = epoch_day(as_of)
        # day >= end - max_age_days, as the store's windows are start < day <= end.
        summary = store.measurement_summary(kind, ids, end - _int_param(params, "max_age_days") - 1, end)
        return summary.latest, summary.count > 0

    return compute


def _register_measurement_functions() -> None:
    for spec in MEASUREMENT_KINDS.values():
        what = spec.summary
        windowed = {
            "mean": (f"Mean of {what} in the last window_days days up to as_of.", _value_bounds(spec)),
            "count": (
                f"Number of {spec.name} values in the last window_days days up to as_of.",
                _count_bounds(spec),
            ),
            "sum": (
                f"Sum of {what} in the last window_days days up to as_of (none without a value).",
                _sum_bounds(spec),
            ),
        }
        for statistic, (summary, bounds) in windowed.items():
            name = f"{statistic}_{spec.name}"
            if name in FUNCTIONS:  # mean_heart_rate, registered above as it always was
                continue
            register(
                name,
                params=_WINDOW,
                kind=spec.name,
                statistic=statistic,
                unit="values" if statistic == "count" else spec.unit,
                summary=summary,
                bounds=bounds,
            )(_windowed(spec.name, statistic))
        register(
            f"latest_{spec.name}",
            params=_MAX_AGE,
            kind=spec.name,
            statistic="latest",
            unit=spec.unit,
            summary=f"Latest {what} (mean of its day) at most max_age_days days before as_of.",
            bounds=_value_bounds(spec),
        )(_latest(spec.name))


_register_measurement_functions()

MAX_AGE_YEARS = 150
"""The upper natural bound of ``age`` (the age brackets' vocabulary ends there too)."""


@register("age", statistic="value", unit="years", bounds=(0.0, float(MAX_AGE_YEARS)))
def age(
    store: Documents,
    ids: Sequence[str],
    params: Mapping[str, object],
    as_of: date,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Age in whole years at as_of, from the birth date (none for someone born after as_of)."""
    birth_days, _, _ = store.identity(ids)
    years = ages_at(birth_days, as_of)
    has = years >= 0
    return np.where(has, years.astype(np.float64), np.nan), has


def group_index(
    store: Documents, ids: Sequence[str], field: str, edges: Sequence[float], as_of: date
) -> npt.NDArray[np.int64]:
    """The bucket of each instance on a group-by field (-1 outside every bucket)."""
    if field not in FIELDS:
        raise DispersError(ErrorCode.NOT_FOUND, f"unknown group-by field {_shown(str(field))}")
    return bucketize(FIELDS[field](store, ids, as_of), edges)


def compute_contributions(
    store: Documents,
    ids: Sequence[str],
    *,
    function: str,
    params: Mapping[str, object],
    as_of: date,
    group_field: str | None,
    edges: Sequence[float] | None,
) -> LocalValues:
    """Compute a batch of instances' local values, groups, and whether each one contributes.

    An instance contributes when it consents, has a value and (when grouping) falls in a group.
    Without ``group_field`` every instance is in group 0. Values of instances that do not
    contribute are NaN.
    """
    fn = get_function(function)
    if group_field is None:
        if edges is not None:
            raise DispersError(ErrorCode.MALFORMED, "edges given without a group-by field")
        field_fn = None
    else:
        if group_field not in FIELDS:
            shown = _shown(str(group_field))
            raise DispersError(ErrorCode.NOT_FOUND, f"unknown group-by field {shown}")
        if edges is None:
            raise DispersError(ErrorCode.MALFORMED, "a group-by field needs edges")
        field_fn = FIELDS[group_field]
        bucketize([], edges)  # reject bad edges before touching any document
    validate_params(function, params)

    values, has_value = fn(store, ids, params, as_of)
    _, _, consent = store.identity(ids)
    if field_fn is None:
        groups = np.zeros(len(ids), dtype=np.int64)
    else:
        assert edges is not None
        groups = bucketize(field_fn(store, ids, as_of), edges)
    ok = consent & has_value & (groups >= 0)
    # The value of an instance that does not contribute never leaves this function.
    values = np.where(ok, values, np.nan)
    logger.debug("%s: %d of %d instances contribute", function, int(ok.sum()), len(ids))
    return LocalValues(values=values, groups=groups, ok=ok)
