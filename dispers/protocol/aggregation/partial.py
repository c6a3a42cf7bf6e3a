"""Mergeable partial aggregates per group: count, means, co-moments (Chan et al.), min, max."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dispers.core.errors import malformed
from dispers.core.spec import (
    FIELD_STATS,
    MAX_FIELD_NAME,
    PAIR_STATS,
    AggregateSpec,
    GroupResult,
    QueryResult,
    ReleaseInfo,
    quantile_key,
)
from dispers.protocol.aggregation.derive import derive, field_key, finish, ols_keys

DROP_REASONS: tuple[str, ...] = ("duplicate", "unopenable", "malformed", "wrong_query", "out_of_bounds")
"""Why a DA leaves an item out of the aggregate."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass
class Partial:
    """Running statistics of `n_fields` values for `n_groups` groups; merging two equals folding
    their values together. Per group: the count, the mean of each field, the co-moments
    sum((x_f - mean_f)(x_g - mean_g)) of each pair of fields (the diagonal is each field's M2),
    each field's min and max, and a histogram of the first field."""

    count: IntArray  # (G,)
    mean: FloatArray  # (G, F)
    co: FloatArray  # (G, F, F), symmetric
    min: FloatArray  # (G, F)
    max: FloatArray  # (G, F)
    dropped: dict[str, int] = field(default_factory=dict)
    declined: int = 0  # decline records received
    edges: tuple[float, ...] = ()  # histogram bins of the first field, when the query asks for them
    hist: IntArray | None = None  # (n_groups, n_bins) counts per bin
    clipped: int = 0  # contributions with a value clipped to its bounds (aggregate.out_of_bounds)

    @classmethod
    def empty(cls, n_groups: int, edges: tuple[float, ...] = (), n_fields: int = 1) -> Partial:
        """No values yet."""
        return cls(
            count=np.zeros(n_groups, dtype=np.int64),
            mean=np.zeros((n_groups, n_fields)),
            co=np.zeros((n_groups, n_fields, n_fields)),
            min=np.full((n_groups, n_fields), np.inf),
            max=np.full((n_groups, n_fields), -np.inf),
            edges=edges,
            hist=np.zeros((n_groups, len(edges) - 1), dtype=np.int64) if edges else None,
        )

    @property
    def n_groups(self) -> int:
        """How many groups."""
        return len(self.count)

    @property
    def n_fields(self) -> int:
        """How many values each contribution carries."""
        return int(self.mean.shape[1])

    @property
    def m2(self) -> FloatArray:
        """The first field's sum of squared deviations from its mean, per group."""
        return self.co[:, 0, 0]

    @classmethod
    def of(
        cls, n_groups: int, groups: npt.ArrayLike, values: npt.ArrayLike, edges: tuple[float, ...] = ()
    ) -> Partial:
        """The partial of a batch, computed vectorised (groups are indices < n_groups; values
        one per group entry, or a row of n_fields values each)."""
        g = np.asarray(groups, dtype=np.int64)
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            v = v.reshape(-1, 1)
        if g.ndim != 1 or v.ndim != 2 or v.shape[0] != g.shape[0]:
            raise ValueError("groups must be 1-d and values one row per group entry")
        if len(g) and (g.min() < 0 or g.max() >= n_groups):
            raise ValueError("group index out of range")
        n_fields = v.shape[1]
        count = np.bincount(g, minlength=n_groups).astype(np.int64)
        safe = np.maximum(count, 1)
        mean = np.empty((n_groups, n_fields))
        columns = np.ascontiguousarray(v.T)
        for f in range(n_fields):
            sums = np.bincount(g, weights=columns[f], minlength=n_groups)
            mean[:, f] = np.where(count > 0, sums / safe, 0.0)
        dev = np.ascontiguousarray((v - mean[g]).T)  # (F, n): one contiguous row per field
        co = np.empty((n_groups, n_fields, n_fields))
        for f in range(n_fields):
            for h in range(f, n_fields):
                co[:, f, h] = co[:, h, f] = np.bincount(g, weights=dev[f] * dev[h], minlength=n_groups)
        # One 1-d ufunc.at per field (a 2-d one is twenty times slower).
        lo = np.full((n_fields, n_groups), np.inf)
        hi = np.full((n_fields, n_groups), -np.inf)
        for f in range(n_fields):
            np.minimum.at(lo[f], g, columns[f])
            np.maximum.at(hi[f], g, columns[f])
        lo, hi = np.ascontiguousarray(lo.T), np.ascontiguousarray(hi.T)
        hist = None
        if edges:
            n_bins = len(edges) - 1
            # Bin b holds edges[b] <= v < edges[b + 1]; the last bin also holds the upper edge
            # (numpy.histogram's convention).
            b = np.clip(np.searchsorted(np.asarray(edges), v[:, 0], side="right") - 1, 0, n_bins - 1)
            hist = np.bincount(g * n_bins + b, minlength=n_groups * n_bins).astype(np.int64)
            hist = hist.reshape(n_groups, n_bins)
        return cls(count, mean, co, lo, hi, edges=edges, hist=hist)

    def add(self, groups: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Fold a batch of values in."""
        self.merge(Partial.of(self.n_groups, groups, values, self.edges))

    @property
    def items(self) -> int:
        """Every item received: contributions, declines and dropped ones (Python integers: a
        child's counts cannot wrap around)."""
        counts: list[int] = self.count.tolist()
        return sum(counts) + self.declined + sum(self.dropped.values())

    def decline(self, n: int = 1) -> None:
        """Count declines."""
        self.declined += n

    def drop(self, reason: str, n: int = 1) -> None:
        """Count contributions left out, by reason."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def merge(self, other: Partial) -> None:
        """Fold another partial in (Chan's parallel update, for co-moments: numerically stable)."""
        if other.n_groups != self.n_groups or other.edges != self.edges or other.n_fields != self.n_fields:
            raise ValueError("partials of different groups, fields or bins do not merge")
        if self.hist is not None and other.hist is not None:
            self.hist = self.hist + other.hist
        na = self.count.astype(np.float64)
        nb = other.count.astype(np.float64)
        n = na + nb
        safe = np.maximum(n, 1.0)
        delta = other.mean - self.mean
        self.mean = np.where((n > 0)[:, None], self.mean + delta * (nb / safe)[:, None], 0.0)
        weight = (na * nb / safe)[:, None, None]
        self.co = self.co + other.co + delta[:, :, None] * delta[:, None, :] * weight
        self.count = self.count + other.count
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        for reason, k in other.dropped.items():
            self.drop(reason, k)
        self.declined += other.declined
        self.clipped += other.clipped

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form (empty groups have null min/max)."""
        empty = self.count == 0
        upper = np.triu_indices(self.n_fields)
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "co": self.co[:, upper[0], upper[1]].tolist(),  # the upper triangle, row by row
            "min": [None if e else row for e, row in zip(empty, self.min.tolist(), strict=True)],
            "max": [None if e else row for e, row in zip(empty, self.max.tolist(), strict=True)],
            "dropped": dict(self.dropped),
            "declined": self.declined,
            "clipped": self.clipped,
            "hist": [] if self.hist is None else self.hist.tolist(),
        }

    @classmethod
    def from_obj(cls, obj: Any, n_groups: int, edges: tuple[float, ...] = (), n_fields: int = 1) -> Partial:
        """Parse and validate a partial received from a child DA."""
        if not isinstance(obj, dict):
            raise malformed("partial aggregate must be an object")
        raw_count = obj.get("count")
        if not isinstance(raw_count, list) or any(
            not isinstance(c, int) or isinstance(c, bool) for c in raw_count
        ):
            raise malformed("partial aggregate counts must be whole numbers")
        n_upper = n_fields * (n_fields + 1) // 2

        def rows(key: str, width: int) -> FloatArray:
            raw = obj[key]
            if not isinstance(raw, list) or any(
                row is not None
                and (
                    not isinstance(row, list)
                    or len(row) != width
                    or any(isinstance(x, bool) or not isinstance(x, int | float) for x in row)
                )
                for row in raw
            ):
                raise malformed(f"partial aggregate {key} must be rows of {width} numbers")
            return np.asarray([[np.nan] * width if row is None else row for row in raw], dtype=np.float64)

        try:
            count = np.asarray(raw_count, dtype=np.int64)
            mean = rows("mean", n_fields)
            upper = rows("co", n_upper)
            lo = rows("min", n_fields)
            hi = rows("max", n_fields)
            dropped = {str(k): int(v) for k, v in dict(obj["dropped"]).items()}
            declined = obj.get("declined", 0)
            clipped = obj.get("clipped", 0)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise malformed("partial aggregate is malformed") from None
        widths = ((mean, n_fields), (upper, n_upper), (lo, n_fields), (hi, n_fields))
        if count.shape != (n_groups,) or any(a.shape != (n_groups, w) for a, w in widths):
            raise malformed("partial aggregate has the wrong number of groups or fields")
        if (count < 0).any() or any(v < 0 for v in dropped.values()):
            raise malformed("partial aggregate has negative counts")
        for name, value in (("decline", declined), ("clipped", clipped)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise malformed(f"partial aggregate has a bad {name} count")
        if not (np.isfinite(mean).all() and np.isfinite(upper).all()):
            raise malformed("partial aggregate has non-finite values")
        empty = count == 0
        for a, fill in ((lo, np.inf), (hi, -np.inf)):
            if np.isnan(a[~empty]).any():
                raise malformed("partial aggregate has non-finite values")
            a[empty] = fill
        co = np.empty((n_groups, n_fields, n_fields))
        i, j = np.triu_indices(n_fields)
        co[:, i, j] = upper
        co[:, j, i] = upper
        if (np.diagonal(co, axis1=1, axis2=2) < 0).any():
            raise malformed("partial aggregate has negative sums of squares")
        hist = None
        if edges:
            raw_hist = obj.get("hist")
            if not isinstance(raw_hist, list) or any(
                not isinstance(row, list) or any(not isinstance(c, int) or isinstance(c, bool) for c in row)
                for row in raw_hist
            ):
                raise malformed("partial aggregate histogram must be whole numbers")
            try:
                hist = np.asarray(raw_hist, dtype=np.int64).reshape(n_groups, len(edges) - 1)
            except ValueError:
                raise malformed("partial aggregate histogram has the wrong shape") from None
            if (hist < 0).any() or (hist.sum(axis=1) != count).any():
                raise malformed("partial aggregate histogram does not add up to its counts")
        return cls(count, mean, co, lo, hi, dropped, declined, edges, hist, clipped)

    def check_possible(self, bounds: tuple[tuple[float, float], ...]) -> None:
        """MALFORMED unless this partial could come from values within `bounds`: min, max and
        means within them, each field's M2 within [0, n R^2], co-moments within Cauchy-Schwarz,
        no more clipped than contributions (a parent's check on a child's partial)."""
        lo = np.asarray([b[0] for b in bounds])
        hi = np.asarray([b[1] for b in bounds])
        held = self.count > 0
        slack = 1e-9
        if (self.min[held] < lo).any() or (self.max[held] > hi).any():
            raise malformed("partial aggregate holds values outside the declared bounds")
        width = hi - lo
        mean = self.mean[held]
        if (mean < lo - slack * width).any() or (mean > hi + slack * width).any():
            raise malformed("partial aggregate holds means outside the declared bounds")
        n = self.count[held].astype(np.float64)
        diag = np.diagonal(self.co[held], axis1=1, axis2=2)
        if (diag > n[:, None] * (width / 2) ** 2 * (1 + slack) + 1e-300).any():
            raise malformed("partial aggregate holds a spread the bounds do not allow")
        cross = self.co[held] ** 2
        outer = diag[:, :, None] * diag[:, None, :]
        if (cross > outer * (1 + slack) + 1e-300).any():
            raise malformed("partial aggregate holds impossible co-moments")
        if (self.count[~held] != 0).any() or self.clipped > sum(self.count.tolist()):
            raise malformed("partial aggregate counts more clipped values than contributions")

    def stats(self, i: int, f: int = 0) -> dict[str, float | None]:
        """Every statistic of group i's field f (var and std are sample statistics, ddof=1)."""
        n = int(self.count[i])
        var = float(self.co[i, f, f] / (n - 1)) if n >= 2 else None
        return {
            "count": n,
            "sum": float(self.mean[i, f] * n),
            "mean": float(self.mean[i, f]) if n else None,
            "var": var,
            "std": math.sqrt(var) if var is not None else None,
            "min": float(self.min[i, f]) if n else None,
            "max": float(self.max[i, f]) if n else None,
        }

    def release(self, spec: AggregateSpec) -> QueryResult:
        """The result the root DA seals to Q, exact (DP off): groups under k suppressed, only
        requested stats; a regression's coefficients come with their 95% intervals (normal
        approximation, from their standard errors)."""
        n = self.count.astype(np.float64)
        raw = derive(spec, n, self.mean, self.co)
        values_by_key = {key: finish(spec, key, r, clip=False) for key, r in raw.items()}
        groups = []
        for i, label in enumerate(spec.groups):
            if int(self.count[i]) < spec.k:
                groups.append(GroupResult(label, True, {}))
                continue
            values: dict[str, float | None] = {}
            for key, arr in values_by_key.items():
                x = float(arr[i])
                values[key] = int(x) if key == "count" else (None if math.isnan(x) else x)
            for f in range(spec.n_fields):
                for stat in ("min", "max"):
                    if stat in spec.stats:
                        values[field_key(spec, f, stat)] = float(getattr(self, stat)[i, f])
            histogram: tuple[float, ...] = ()
            intervals: dict[str, tuple[float, float]] = {}
            if spec.regression is not None:
                for name in ols_keys(spec):
                    v, se = values[f"ols.{name}"], values[f"ols.se.{name}"]
                    if v is not None and se is not None:
                        intervals[f"ols.{name}"] = (v - Z95 * se, v + Z95 * se)
            if self.hist is not None:
                row = self.hist[i].astype(np.float64)
                if "histogram" in spec.stats:
                    histogram = tuple(row.tolist())
                for key, level in histogram_levels(spec):
                    values[key], intervals[key] = histogram_quantile(row, spec.bins, level)
            groups.append(GroupResult(label, False, values, intervals, histogram=histogram))
        released = sum(int(self.count[i]) for i, g in enumerate(groups) if not g.suppressed)

        def under_k(n: int) -> int | None:
            return n if n >= spec.k else None

        return QueryResult(
            query_id=spec.query_id,
            k=spec.k,
            groups=tuple(groups),
            # Only released groups count: a total over suppressed ones would give their size away.
            contributions=released,
            # A count under k is reported as such, with no number (DESIGN.md "What a release
            # may carry"): one out-of-bounds value must not be countable.
            # Every reason is listed, zero or not, so that a key's presence says nothing either.
            dropped={reason: under_k(self.dropped.get(reason, 0)) for reason in DROP_REASONS},
            declined=under_k(self.declined),
            clipped=under_k(self.clipped) if spec.clip else None,
        )


Z95 = 1.959963984540054
"""The 97.5% quantile of the standard normal."""


def histogram_levels(spec: AggregateSpec) -> list[tuple[str, float]]:
    """The (name, level) of every quantile the spec asks: the median and the listed levels."""
    out = [("median", 0.5)] if "median" in spec.stats else []
    if "quantiles" in spec.stats:
        out += [(quantile_key(q), q) for q in spec.quantiles]
    return out


def histogram_quantile(
    counts: FloatArray, edges: tuple[float, ...], level: float
) -> tuple[float | None, tuple[float, float]]:
    """A quantile read off a histogram: the bin where the cumulative count reaches the level,
    linearly within it. Its resolution is that bin, returned as the interval (the value lies in
    it); None when the histogram is empty."""
    counts = np.maximum(counts, 0.0)
    total = float(counts.sum())
    if total <= 0:
        return None, (edges[0], edges[-1])
    target = level * total
    cumulative = np.cumsum(counts)
    b = min(int(np.searchsorted(cumulative, target, side="left")), len(counts) - 1)
    before = float(cumulative[b - 1]) if b else 0.0
    frac = (target - before) / counts[b] if counts[b] > 0 else 0.5
    lo, hi = edges[b], edges[b + 1]
    return float(lo + min(max(frac, 0.0), 1.0) * (hi - lo)), (lo, hi)


def worst_case_sizes(
    n_groups: int, n_bins: int = 0, n_quantiles: int = 0, n_fields: int = 1
) -> tuple[int, int]:
    """The longest signed partial and signed result (bytes) a query of `n_groups` groups and
    up to `n_fields` fields can give, so that the cluster's frames can be checked to hold them
    whatever the data: every count at its largest, every float at its longest text, every label
    and field name at its longest (edges within ±MAX_BOUND), every statistic requested and every
    group released."""
    from dispers.core.ids import new_query_id
    from dispers.crypto.keys import SigningKeyPair
    from dispers.protocol.common import sign_payload

    long_float = -1.2345678901234567e-300  # 24 characters, the longest a float64 prints
    big = 2**62  # 19 digits: more items than any cluster holds
    edges = tuple(long_float + i for i in range(n_bins + 1)) if n_bins else ()
    f = n_fields
    partial = Partial(
        edges=edges,
        hist=np.full((n_groups, n_bins), big, dtype=np.int64) if n_bins else None,
        count=np.full(n_groups, big, dtype=np.int64),
        mean=np.full((n_groups, f), long_float),
        co=np.full((n_groups, f, f), long_float),
        min=np.full((n_groups, f), long_float),
        max=np.full((n_groups, f), long_float),
        dropped=dict.fromkeys(DROP_REASONS, big),
        declined=big,
        clipped=big,
    )
    one = f"{long_float!r}-{long_float!r}"
    label = f"{one} & {one}"  # two group-by fields
    names = [chr(ord("a") + i % 26) * MAX_FIELD_NAME for i in range(f)]
    keys = ["count", *(f"{n}.{s}" for n in names for s in FIELD_STATS)]
    keys += [f"{s}({a},{b})" for s in PAIR_STATS for i, a in enumerate(names) for b in names[i + 1 :]]
    if f >= 2:
        keys += ["ols.intercept", "ols.se.intercept", "ols.r2"]
        keys += [f"ols.{p}{n}" for n in names[1:] for p in ("", "se.")]
    # Distinct quantile keys at their longest: quantile_key(1.23456e-300) is 13 characters.
    keys += ["median", *(f"q1.2345{i % 10}e-{100 + i // 10}" for i in range(n_quantiles))]
    result = QueryResult(
        query_id=new_query_id(),
        k=big,
        groups=tuple(
            GroupResult(
                label,
                False,
                {s: (big if s == "count" else long_float) for s in keys},
                {s: (long_float, long_float) for s in keys},
                {s: long_float for s in keys},
                histogram=tuple([long_float] * n_bins),
            )
            for _ in range(n_groups)
        ),
        contributions=big,
        dropped=dict.fromkeys(DROP_REASONS, big),
        declined=big,
        clipped=big,
        privacy=ReleaseInfo(True, "gaussian", long_float, long_float, long_float, long_float, "basic"),
        plan={"root": "a" * 63, "depth": big, "leaves": big, "aggregators": big, "fan_out": big},
    )
    key, qid, signer = SigningKeyPair.generate(), new_query_id(), "a" * 63  # the longest name
    partial_len = len(sign_payload(key, signer, {"query_id": qid, "partial": partial.to_obj()}))
    result_len = len(sign_payload(key, signer, {"query_id": qid, "result": result.to_obj()}))
    return partial_len, result_len


def merged(parts: Mapping[str, Partial] | list[Partial], n_groups: int, n_fields: int = 1) -> Partial:
    """Merge many partials into a new one."""
    out = Partial.empty(n_groups, n_fields=n_fields)
    for p in parts.values() if isinstance(parts, Mapping) else parts:
        out.merge(p)
    return out
