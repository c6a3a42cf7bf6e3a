"""Mergeable partial aggregates per group: count, mean, M2 (Chan et al.), min, max."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dispers.core.errors import malformed
from dispers.core.spec import STATS, AggregateSpec, GroupResult, QueryResult, ReleaseInfo, quantile_key

DROP_REASONS: tuple[str, ...] = ("duplicate", "unopenable", "malformed", "wrong_query", "out_of_bounds")
"""Why a DA leaves an item out of the aggregate."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass
class Partial:
    """Running statistics for `n_groups` groups; merging two equals folding their values together."""

    count: IntArray
    mean: FloatArray
    m2: FloatArray
    min: FloatArray
    max: FloatArray
    dropped: dict[str, int] = field(default_factory=dict)
    declined: int = 0  # decline records received
    edges: tuple[float, ...] = ()  # histogram bins, when the query asks for them
    hist: IntArray | None = None  # (n_groups, n_bins) counts per bin

    @classmethod
    def empty(cls, n_groups: int, edges: tuple[float, ...] = ()) -> Partial:
        """No values yet."""
        return cls(
            count=np.zeros(n_groups, dtype=np.int64),
            mean=np.zeros(n_groups),
            m2=np.zeros(n_groups),
            min=np.full(n_groups, np.inf),
            max=np.full(n_groups, -np.inf),
            edges=edges,
            hist=np.zeros((n_groups, len(edges) - 1), dtype=np.int64) if edges else None,
        )

    @property
    def n_groups(self) -> int:
        """How many groups."""
        return len(self.count)

    @classmethod
    def of(
        cls, n_groups: int, groups: npt.ArrayLike, values: npt.ArrayLike, edges: tuple[float, ...] = ()
    ) -> Partial:
        """The partial of a batch, computed vectorised (groups are indices < n_groups)."""
        g = np.asarray(groups, dtype=np.int64)
        v = np.asarray(values, dtype=np.float64)
        if g.shape != v.shape or g.ndim != 1:
            raise ValueError("groups and values must be 1-d arrays of one length")
        if len(g) and (g.min() < 0 or g.max() >= n_groups):
            raise ValueError("group index out of range")
        count = np.bincount(g, minlength=n_groups).astype(np.int64)
        sums = np.bincount(g, weights=v, minlength=n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, sums / np.maximum(count, 1), 0.0)
        dev = v - mean[g]
        m2 = np.bincount(g, weights=dev * dev, minlength=n_groups).astype(np.float64)
        lo = np.full(n_groups, np.inf)
        hi = np.full(n_groups, -np.inf)
        np.minimum.at(lo, g, v)
        np.maximum.at(hi, g, v)
        hist = None
        if edges:
            n_bins = len(edges) - 1
            # Bin b holds edges[b] <= v < edges[b + 1]; the last bin also holds the upper edge
            # (numpy.histogram's convention).
            b = np.clip(np.searchsorted(np.asarray(edges), v, side="right") - 1, 0, n_bins - 1)
            hist = np.bincount(g * n_bins + b, minlength=n_groups * n_bins).astype(np.int64)
            hist = hist.reshape(n_groups, n_bins)
        return cls(count, mean, m2, lo, hi, edges=edges, hist=hist)

    def add(self, groups: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Fold a batch of values in."""
        self.merge(Partial.of(self.n_groups, groups, values, self.edges))

    @property
    def items(self) -> int:
        """Every item received: contributions, declines and dropped ones."""
        return int(self.count.sum()) + self.declined + sum(self.dropped.values())

    def decline(self, n: int = 1) -> None:
        """Count declines."""
        self.declined += n

    def drop(self, reason: str, n: int = 1) -> None:
        """Count contributions left out, by reason."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def merge(self, other: Partial) -> None:
        """Fold another partial in (Chan's parallel update: numerically stable)."""
        if other.n_groups != self.n_groups or other.edges != self.edges:
            raise ValueError("partials of different groups or bins do not merge")
        if self.hist is not None and other.hist is not None:
            self.hist = self.hist + other.hist
        na = self.count.astype(np.float64)
        nb = other.count.astype(np.float64)
        n = na + nb
        safe = np.maximum(n, 1.0)
        delta = other.mean - self.mean
        self.mean = np.where(n > 0, self.mean + delta * nb / safe, 0.0)
        self.m2 = self.m2 + other.m2 + delta * delta * na * nb / safe
        self.count = self.count + other.count
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        for reason, k in other.dropped.items():
            self.drop(reason, k)
        self.declined += other.declined

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form (empty groups have null min/max)."""
        empty = self.count == 0
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": [None if e else x for e, x in zip(empty, self.min.tolist(), strict=True)],
            "max": [None if e else x for e, x in zip(empty, self.max.tolist(), strict=True)],
            "dropped": dict(self.dropped),
            "declined": self.declined,
            "hist": [] if self.hist is None else self.hist.tolist(),
        }

    @classmethod
    def from_obj(cls, obj: Any, n_groups: int, edges: tuple[float, ...] = ()) -> Partial:
        """Parse and validate a partial received from a child DA."""
        if not isinstance(obj, dict):
            raise malformed("partial aggregate must be an object")
        raw_count = obj.get("count")
        if not isinstance(raw_count, list) or any(
            not isinstance(c, int) or isinstance(c, bool) for c in raw_count
        ):
            raise malformed("partial aggregate counts must be whole numbers")
        try:
            count = np.asarray(raw_count, dtype=np.int64)
            mean = np.asarray(obj["mean"], dtype=np.float64)
            m2 = np.asarray(obj["m2"], dtype=np.float64)
            lo = np.asarray([np.inf if x is None else x for x in obj["min"]], dtype=np.float64)
            hi = np.asarray([-np.inf if x is None else x for x in obj["max"]], dtype=np.float64)
            dropped = {str(k): int(v) for k, v in dict(obj["dropped"]).items()}
            declined = obj.get("declined", 0)
        except (KeyError, TypeError, ValueError):
            raise malformed("partial aggregate is malformed") from None
        if any(a.shape != (n_groups,) for a in (count, mean, m2, lo, hi)):
            raise malformed("partial aggregate has the wrong number of groups")
        if (count < 0).any() or (m2 < 0).any() or any(v < 0 for v in dropped.values()):
            raise malformed("partial aggregate has negative counts")
        if not isinstance(declined, int) or isinstance(declined, bool) or declined < 0:
            raise malformed("partial aggregate has a bad decline count")
        if (
            not (np.isfinite(mean).all() and np.isfinite(m2).all())
            or np.isnan(lo).any()
            or np.isnan(hi).any()
        ):
            raise malformed("partial aggregate has non-finite values")
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
        return cls(count, mean, m2, lo, hi, dropped, declined, edges, hist)

    def stats(self, i: int) -> dict[str, float | None]:
        """Every statistic of group i (var and std are sample statistics, ddof=1)."""
        n = int(self.count[i])
        var = float(self.m2[i] / (n - 1)) if n >= 2 else None
        return {
            "count": n,
            "sum": float(self.mean[i] * n),
            "mean": float(self.mean[i]) if n else None,
            "var": var,
            "std": math.sqrt(var) if var is not None else None,
            "min": float(self.min[i]) if n else None,
            "max": float(self.max[i]) if n else None,
        }

    def release(self, spec: AggregateSpec) -> QueryResult:
        """The result the root DA seals to Q: groups under k suppressed, only requested stats."""
        groups = []
        for i, label in enumerate(spec.groups):
            if int(self.count[i]) < spec.k:
                groups.append(GroupResult(label, True, {}))
                continue
            every = self.stats(i)
            values = {s: every[s] for s in spec.stats if s in every}
            histogram: tuple[float, ...] = ()
            intervals: dict[str, tuple[float, float]] = {}
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
        )


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


def worst_case_sizes(n_groups: int, n_bins: int = 0, n_quantiles: int = 0) -> tuple[int, int]:
    """The longest signed partial and signed result (bytes) a query of `n_groups` groups can
    give, so that the cluster's frames can be checked to hold them whatever the data: every
    count at its largest, every float at its longest text, every label at its longest (edges
    within ±MAX_BOUND), every statistic requested and every group released."""
    from dispers.core.ids import new_query_id
    from dispers.crypto.keys import SigningKeyPair
    from dispers.protocol.common import sign_payload

    long_float = -1.2345678901234567e-300  # 24 characters, the longest a float64 prints
    big = 2**62  # 19 digits: more items than any cluster holds
    edges = tuple(long_float + i for i in range(n_bins + 1)) if n_bins else ()
    partial = Partial(
        edges=edges,
        hist=np.full((n_groups, n_bins), big, dtype=np.int64) if n_bins else None,
        count=np.full(n_groups, big, dtype=np.int64),
        mean=np.full(n_groups, long_float),
        m2=np.full(n_groups, long_float),
        min=np.full(n_groups, long_float),
        max=np.full(n_groups, long_float),
        dropped=dict.fromkeys(DROP_REASONS, big),
        declined=big,
    )
    label = f"{long_float!r}-{long_float!r}"
    result = QueryResult(
        query_id=new_query_id(),
        k=big,
        groups=tuple(
            GroupResult(
                label,
                False,
                {
                    s: (big if s == "count" else long_float)
                    for s in (*STATS, *(f"q{i}" for i in range(n_quantiles)))
                },
                {s: (long_float, long_float) for s in (*STATS, *(f"q{i}" for i in range(n_quantiles)))},
                {s: long_float for s in STATS},
                histogram=tuple([long_float] * n_bins),
            )
            for _ in range(n_groups)
        ),
        contributions=big,
        dropped=dict.fromkeys(DROP_REASONS, big),
        declined=big,
        privacy=ReleaseInfo(True, "gaussian", long_float, long_float, long_float, long_float),
    )
    key, qid, signer = SigningKeyPair.generate(), new_query_id(), "a" * 63  # the longest name
    partial_len = len(sign_payload(key, signer, {"query_id": qid, "partial": partial.to_obj()}))
    result_len = len(sign_payload(key, signer, {"query_id": qid, "result": result.to_obj()}))
    return partial_len, result_len


def merged(parts: Mapping[str, Partial] | list[Partial], n_groups: int) -> Partial:
    """Merge many partials into a new one."""
    out = Partial.empty(n_groups)
    for p in parts.values() if isinstance(parts, Mapping) else parts:
        out.merge(p)
    return out
