"""Reference answers computed directly from a Population in numpy, independent of the protocol.

Nothing here reads a document store or calls the registry of local functions: the values a
function should give are recomputed from the Population's arrays, so that tests can compare
the two. The functions are those the registry documents: ``mean_<kind>``, ``count_<kind>``,
``sum_<kind>`` over as_of - window_days < day <= as_of; ``latest_<kind>``, the mean of the
values of the latest day at most max_age_days before as_of; ``age`` in whole years.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.expression import And, Expr, Not, Or, Ref, compile_named, parse_positional
from dispers.simulation.population import MEASURED_KINDS, Population

_EPOCH = date(1970, 1, 1)

# The registry's documented parameter defaults, restated (a test checks they agree).
PARAM_DEFAULTS: dict[str, dict[str, int]] = {
    "mean": {"window_days": 30},
    "count": {"window_days": 30},
    "sum": {"window_days": 30},
    "latest": {"max_age_days": 30},
    "age": {},
}
SEX_GROUP = {False: 1, True: 0}  # the sex field's codes: F (female) 0, M 1


@dataclass(frozen=True)
class GroupTruth:
    """Exact statistics of one group's values; NaN where undefined (no values, or one for var)."""

    count: int
    sum: float
    mean: float
    var: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: npt.NDArray[np.float64]) -> GroupTruth:
        """Summarise ``values``; sample variance (ddof=1)."""
        n = len(values)
        if n == 0:
            nan = math.nan
            return cls(count=0, sum=0.0, mean=nan, var=nan, std=nan, min=nan, max=nan)
        var = float(np.var(values, ddof=1)) if n >= 2 else math.nan
        return cls(
            count=n,
            sum=float(values.sum()),
            mean=float(values.mean()),
            var=var,
            std=math.sqrt(var),
            min=float(values.min()),
            max=float(values.max()),
        )


def bracket_label(lo: float, hi: float) -> str:
    """Label a bracket like ``12-25``."""
    return f"{lo:g}-{hi:g}"


def _brackets(edges: Sequence[float]) -> list[tuple[float, float]]:
    if len(edges) < 2 or any(not b > a for a, b in zip(edges, edges[1:], strict=False)):
        raise DispersError(ErrorCode.MALFORMED, "edges must be at least two increasing values")
    return [(float(a), float(b)) for a, b in zip(edges, edges[1:], strict=False)]


def _parse(function: str) -> tuple[str, str | None]:
    """(statistic, kind) of a function name, e.g. ("mean", "steps") or ("age", None)."""
    if function == "age":
        return "age", None
    statistic, _, kind = str(function).partition("_")
    if statistic not in PARAM_DEFAULTS or kind not in MEASURED_KINDS:
        raise DispersError(ErrorCode.NOT_FOUND, f"no ground truth for function {str(function)[:64]!r}")
    return statistic, kind


def _params(function: str, statistic: str, params: Mapping[str, object] | None) -> dict[str, int]:
    defaults = PARAM_DEFAULTS[statistic]
    given = dict(params or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise DispersError(ErrorCode.MALFORMED, f"{function}: unknown parameters {sorted(unknown)}")
    out = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise DispersError(ErrorCode.MALFORMED, f"{function}: parameter {key!r} must be an integer")
        out[key] = int(value)
    return out


def local_values(
    pop: Population, function: str, params: Mapping[str, object] | None, as_of: date
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Per instance of ``pop``, the value of local function ``function`` on ``as_of``.

    Returns (values, has_value) in the order of the instances; values are NaN where there is
    none. Missing params take the registry's defaults. Consent plays no part here.
    """
    statistic, kind = _parse(function)
    checked = _params(function, statistic, params)
    n = pop.n_instances
    if kind is None:
        ages = pop.ages_at(as_of)
        has = ages >= 0
        return np.where(has, ages.astype(np.float64), np.nan), has

    series = pop.series(kind)
    end = (as_of - _EPOCH).days
    oldest = end - checked["max_age_days"] if statistic == "latest" else end - checked["window_days"] + 1
    inside = (series.day >= oldest) & (series.day <= end)
    owner, day, value = series.owner[inside], series.day[inside], series.value[inside]
    counts = np.bincount(owner, minlength=n)
    sums = np.bincount(owner, weights=value, minlength=n).astype(np.float64)
    has = counts > 0
    if statistic == "count":
        return counts.astype(np.float64), np.ones(n, dtype=bool)
    if statistic == "sum":
        return np.where(has, sums, np.nan), has
    if statistic == "mean":
        return np.divide(sums, counts, out=np.full(n, np.nan), where=has), has
    last = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, owner, day)
    on_last = day == last[owner]
    last_counts = np.bincount(owner[on_last], minlength=n)
    last_sums = np.bincount(owner[on_last], weights=value[on_last], minlength=n)
    return np.divide(last_sums, last_counts, out=np.full(n, np.nan), where=has), has


def group_field_values(pop: Population, group_field: str, as_of: date) -> npt.NDArray[np.float64]:
    """Each instance's value of a group-by field: ``age`` in years, or ``sex`` coded F 0, M 1."""
    if group_field == "age":
        return pop.ages_at(as_of).astype(np.float64)
    if group_field == "sex":
        return np.where(pop.female, float(SEX_GROUP[True]), float(SEX_GROUP[False]))
    raise DispersError(ErrorCode.NOT_FOUND, f"no ground truth for field {str(group_field)[:64]!r}")


def concept_mask(pop: Population, concept: str, as_of: date) -> npt.NDArray[np.bool_]:
    """Which instances hold ``concept`` on ``as_of``: an age bracket ``age:lo-hi`` (lo <= age <
    hi), ``sex:F`` / ``sex:M``, or ``has:<kind>`` (a measurement on or before as_of); a
    generated population declares no other concept."""
    namespace, _, value = concept.partition(":")
    if namespace == "age":
        lo, _, hi = value.partition("-")
        ages = pop.ages_at(as_of)
        return (ages >= int(lo)) & (ages < int(hi))
    if namespace == "sex" and value in ("F", "M"):
        return pop.female if value == "F" else ~pop.female
    if namespace == "has" and value in MEASURED_KINDS:
        series = pop.series(value)
        out = np.zeros(pop.n_instances, dtype=bool)
        out[series.owner[series.day <= (as_of - _EPOCH).days]] = True
        return out
    return np.zeros(pop.n_instances, dtype=bool)


def target_mask(pop: Population, target: str, as_of: date) -> npt.NDArray[np.bool_]:
    """Which instances a target expression over concept names selects (every instance
    subscribed: NOT is the complement within the whole population)."""
    concepts, positional = compile_named(target)
    masks = [concept_mask(pop, c, as_of) for c in concepts]

    def walk(expr: Expr) -> npt.NDArray[np.bool_]:
        if isinstance(expr, Ref):
            return masks[expr.index]
        if isinstance(expr, Not):
            return ~walk(expr.operand)
        if isinstance(expr, And):
            return walk(expr.left) & walk(expr.right)
        assert isinstance(expr, Or)
        return walk(expr.left) | walk(expr.right)

    return walk(parse_positional(positional, len(concepts)))


def stats_by_group(
    pop: Population,
    function: str,
    params: Mapping[str, object] | None,
    as_of: date,
    *,
    group_field: str | None = None,
    edges: Sequence[float] | None = None,
    bounds: tuple[float, float] | None = None,
    target: str | None = None,
) -> dict[str, GroupTruth]:
    """Statistics of the consenting instances' values of ``function``, per group.

    An instance counts if it consents, has a value, is selected by the ``target`` expression
    (when given) and (when grouping) its field value is in a bracket lo <= v < hi of ``edges``;
    labels are ``lo-hi``, or ``all`` without a field. With ``bounds``, values outside [lo, hi]
    are left out, as a DA drops them.
    """
    values, has = local_values(pop, function, params, as_of)
    keep = pop.consent & has
    if target is not None:
        keep &= target_mask(pop, target, as_of)
    if bounds is not None:
        lo, hi = bounds
        keep &= (values >= lo) & (values <= hi)
    if group_field is None:
        if edges is not None:
            raise DispersError(ErrorCode.MALFORMED, "edges given without a group-by field")
        return {"all": GroupTruth.of(values[keep])}
    if edges is None:
        raise DispersError(ErrorCode.MALFORMED, "a group-by field needs edges")
    field = group_field_values(pop, group_field, as_of)
    result: dict[str, GroupTruth] = {}
    for lo_edge, hi_edge in _brackets(edges):
        member = keep & (field >= lo_edge) & (field < hi_edge)
        result[bracket_label(lo_edge, hi_edge)] = GroupTruth.of(values[member])
    return result


def mean_heart_rate_by_age(
    pop: Population,
    *,
    edges: Sequence[float],
    window_days: int,
    as_of: date,
    bounds: tuple[float, float] | None = None,
) -> dict[str, GroupTruth]:
    """Per age bracket, statistics of each consenting person's mean recent heart rate.

    A person counts if they consent, their age is in a bracket (lo <= age < hi) and they have
    at least one measurement with as_of - window_days < day <= as_of; their value is the mean
    of those measurements. With ``bounds``, values outside [lo, hi] are left out.
    """
    return stats_by_group(
        pop,
        "mean_heart_rate",
        {"window_days": window_days},
        as_of,
        group_field="age",
        edges=edges,
        bounds=bounds,
    )


def targeted_count(pop: Population, edges: Sequence[float], as_of: date) -> int:
    """Count the people whose age is in any bracket, whatever their consent or data."""
    ages = pop.ages_at(as_of)
    member = np.zeros(pop.n_instances, dtype=bool)
    for lo, hi in _brackets(edges):
        member |= (ages >= lo) & (ages < hi)
    return int(member.sum())
