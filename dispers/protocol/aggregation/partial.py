"""Mergeable partial aggregates per group: count, mean, M2 (Chan et al.), min, max."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dispers.core.errors import malformed
from dispers.core.spec import STATS, AggregateSpec, GroupResult, QueryResult

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

    @classmethod
    def empty(cls, n_groups: int) -> Partial:
        """No values yet."""
        return cls(
            count=np.zeros(n_groups, dtype=np.int64),
            mean=np.zeros(n_groups),
            m2=np.zeros(n_groups),
            min=np.full(n_groups, np.inf),
            max=np.full(n_groups, -np.inf),
        )

    @property
    def n_groups(self) -> int:
        """How many groups."""
        return len(self.count)

    @classmethod
    def of(cls, n_groups: int, groups: npt.ArrayLike, values: npt.ArrayLike) -> Partial:
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
        return cls(count, mean, m2, lo, hi)

    def add(self, groups: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Fold a batch of values in."""
        self.merge(Partial.of(self.n_groups, groups, values))

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
        if other.n_groups != self.n_groups:
            raise ValueError("partials of different group counts do not merge")
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
        }

    @classmethod
    def from_obj(cls, obj: Any, n_groups: int) -> Partial:
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
        return cls(count, mean, m2, lo, hi, dropped, declined)

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
            groups.append(GroupResult(label, False, {s: every[s] for s in spec.stats}))
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


def worst_case_sizes(n_groups: int) -> tuple[int, int]:
    """The longest signed partial and signed result (bytes) a query of `n_groups` groups can
    give, so that the cluster's frames can be checked to hold them whatever the data: every
    count at its largest, every float at its longest text, every label at its longest (edges
    within ±MAX_BOUND), every statistic requested and every group released."""
    from dispers.core.ids import new_query_id
    from dispers.crypto.keys import SigningKeyPair
    from dispers.protocol.common import sign_payload

    long_float = -1.2345678901234567e-300  # 24 characters, the longest a float64 prints
    big = 2**62  # 19 digits: more items than any cluster holds
    partial = Partial(
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
            GroupResult(label, False, {s: (big if s == "count" else long_float) for s in STATS})
            for _ in range(n_groups)
        ),
        contributions=big,
        dropped=dict.fromkeys(DROP_REASONS, big),
        declined=big,
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
