"""Reference answers computed directly from a Population in numpy, independent of the protocol."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode
from dispers.simulation.population import Population

_EPOCH = date(1970, 1, 1)


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
    brackets = _brackets(edges)
    end = (as_of - _EPOCH).days
    recent = (pop.hr_day > end - window_days) & (pop.hr_day <= end)
    owners = pop.hr_owner[recent]
    n = pop.n_instances
    counts = np.bincount(owners, minlength=n)
    sums = np.bincount(owners, weights=pop.hr_bpm[recent], minlength=n)
    has = counts > 0
    values = np.divide(sums, counts, out=np.full(n, np.nan), where=has)
    keep = pop.consent & has
    if bounds is not None:
        lo, hi = bounds
        keep &= (values >= lo) & (values <= hi)
    ages = pop.ages_at(as_of)
    result: dict[str, GroupTruth] = {}
    for lo_age, hi_age in brackets:
        member = keep & (ages >= lo_age) & (ages < hi_age)
        result[bracket_label(lo_age, hi_age)] = GroupTruth.of(values[member])
    return result


def targeted_count(pop: Population, edges: Sequence[float], as_of: date) -> int:
    """Count the people whose age is in any bracket, whatever their consent or data."""
    ages = pop.ages_at(as_of)
    member = np.zeros(pop.n_instances, dtype=bool)
    for lo, hi in _brackets(edges):
        member |= (ages >= lo) & (ages < hi)
    return int(member.sum())
