"""The registries of local functions and group-by fields an instance computes contributions with."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.documents import DocumentStore, epoch_day

logger = logging.getLogger(__name__)

_MAX_NAME_IN_ERROR = 64


class LocalFunction(Protocol):
    """Computes one value per instance of a batch from the instances' own documents.

    Returns (values, has_value); values are NaN where has_value is False.
    """

    def __call__(
        self,
        store: DocumentStore,
        ids: Sequence[str],
        params: Mapping[str, object],
        as_of: date,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]: ...


FieldFunction = Callable[[DocumentStore, Sequence[str], date], npt.NDArray[np.float64]]


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


FUNCTIONS: dict[str, LocalFunction] = {}
FIELDS: dict[str, FieldFunction] = {}
_PARAMS: dict[str, Mapping[str, IntParam]] = {}


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


def register(
    name: str, *, params: Mapping[str, IntParam] | None = None
) -> Callable[[LocalFunction], LocalFunction]:
    """Register a local function under ``name``; its params are validated before each call."""

    def decorate(fn: LocalFunction) -> LocalFunction:
        if name in FUNCTIONS:
            raise ValueError(f"local function {name!r} is registered twice")

        @functools.wraps(fn)
        def checked(
            store: DocumentStore,
            ids: Sequence[str],
            params: Mapping[str, object],
            as_of: date,
        ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
            return fn(store, ids, validate_params(name, params), as_of)

        FUNCTIONS[name] = checked
        _PARAMS[name] = dict(params or {})
        return checked

    return decorate


def register_field(name: str) -> Callable[[FieldFunction], FieldFunction]:
    """Register a group-by field under ``name``."""

    def decorate(fn: FieldFunction) -> FieldFunction:
        if name in FIELDS:
            raise ValueError(f"group-by field {name!r} is registered twice")
        FIELDS[name] = fn
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


@register_field("age")
def _age_field(store: DocumentStore, ids: Sequence[str], as_of: date) -> npt.NDArray[np.float64]:
    birth_days, _, _ = store.identity(ids)
    return ages_at(birth_days, as_of).astype(np.float64)


@register_field("sex")
def _sex_field(store: DocumentStore, ids: Sequence[str], as_of: date) -> npt.NDArray[np.float64]:
    _, female, _ = store.identity(ids)
    return np.where(female, 0.0, 1.0)


def _int_param(params: Mapping[str, object], key: str) -> int:
    value = params[key]
    assert isinstance(value, int)  # validate_params made it so
    return value


@register("mean_heart_rate", params={"window_days": IntParam(default=30, lo=1, hi=3650)})
def mean_heart_rate(
    store: DocumentStore,
    ids: Sequence[str],
    params: Mapping[str, object],
    as_of: date,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Mean of the heart-rate measurements of the last ``window_days`` days up to ``as_of``."""
    end = epoch_day(as_of)
    count, mean = store.heart_rate_summary(ids, end - _int_param(params, "window_days"), end)
    return mean, count > 0


def compute_contributions(
    store: DocumentStore,
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
