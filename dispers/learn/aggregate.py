"""Model updates as fixed-length contributions and mergeable sums; the root's noised average.

An instance's update travels as one `ContributionLayout(n_params + 1)` record: its weighted,
clipped update and its weight (1 for uniform weighting, its number of records for weighting
by examples). A decline (no records, no consent, already answered) has the same length. DAs
add records into an `UpdateSum`; sums merge in any tree shape (addition), and the root turns
the merged sum into the round's average update:

- without DP: sum(w u) / sum(w), the exact (weighted) FedAvg average;
- with user-level DP (DP-FedAvg, McMahan et al. 2018): each u is clipped to norm C and weighted
  uniformly; Gaussian noise of standard deviation z C is added to sum(u), divided by the cohort
  size asked (public, so the denominator leaks nothing about who answered).

The noise is OpenDP's discrete Gaussian on a grid fine against z C (dispers.protocol.aggregation.dp),
its sigma scaled so that z holds against the sensitivity C plus the grid's rounding.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dispers.core.errors import malformed
from dispers.core.wire import ContributionLayout

FloatArray = npt.NDArray[np.float64]
GRID_FRACTION = 64_000  # grid steps per noise standard deviation
NORM_SLACK = 1e-6  # float rounding on a clipped update's norm, tolerated by the DA


def update_layout(n_params: int) -> ContributionLayout:
    """The record of an update of `n_params` values: the weighted values, then the weight."""
    return ContributionLayout(n_params + 1)


def encode_update(layout: ContributionLayout, query_id: str, update: FloatArray, weight: float) -> bytes:
    """One instance's update as a fixed-length record (group 0)."""
    values = np.concatenate([np.asarray(update, dtype=np.float64) * weight, [weight]])
    return layout.encode(query_id, 0, values)


def _vector(b64: object, n: int, what: str) -> FloatArray:
    if not isinstance(b64, str):
        raise malformed(f"{what} is missing")
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        raise malformed(f"{what} is not valid base64") from None
    if len(raw) != 8 * n:
        raise malformed(f"{what} has the wrong length")
    v = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.isfinite(v).all():
        raise malformed(f"{what} holds non-finite values")
    return v


@dataclass
class UpdateSum:
    """A partial of a training round: the sum of weighted updates, of weights, and counts."""

    total: FloatArray
    weight: float = 0.0
    count: int = 0  # updates added
    declines: int = 0
    cut: int = 0  # of the declines, instances whose training the round time stopped
    dropped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_params: int) -> UpdateSum:
        """Nothing added yet."""
        return cls(np.zeros(n_params))

    @property
    def items(self) -> int:
        """Every record this sum accounts for (updates, declines, drops)."""
        return self.count + self.declines + sum(self.dropped.values())

    def add(self, values: FloatArray) -> None:
        """Fold records' fields (rows of n_params + 1 values) into the sum."""
        if len(values):
            self.total += values[:, :-1].sum(axis=0)
            self.weight += float(values[:, -1].sum())
            self.count += len(values)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count records left out, by reason."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def merge(self, other: UpdateSum) -> None:
        """Add another partial of the same round (any tree shape gives the same sum)."""
        self.total += other.total
        self.weight += other.weight
        self.count += other.count
        self.declines += other.declines
        self.cut += other.cut
        for reason, n in other.dropped.items():
            self.drop(reason, n)

    def to_obj(self) -> dict[str, Any]:
        """JSON form (the vector as base64 of little-endian float64)."""
        return {
            "total": base64.b64encode(self.total.astype("<f8").tobytes()).decode(),
            "weight": self.weight,
            "count": self.count,
            "declines": self.declines,
            "cut": self.cut,
            "dropped": dict(self.dropped),
        }

    @classmethod
    def from_obj(cls, obj: object, n_params: int) -> UpdateSum:
        """Inverse of to_obj, checking every field."""
        what = "update sum"
        if not isinstance(obj, dict):
            raise malformed(f"{what} is not an object")
        weight, count, declines = obj.get("weight"), obj.get("count"), obj.get("declines")
        cut = obj.get("cut")
        dropped = obj.get("dropped")
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise malformed(f"{what}: weight must be a non-negative number")
        for name, n in (("count", count), ("declines", declines), ("cut", cut)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise malformed(f"{what}: {name} must be a non-negative integer")
        if not isinstance(dropped, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in dropped.items()
        ):
            raise malformed(f"{what}: dropped must map reasons to counts")
        assert isinstance(count, int) and isinstance(declines, int) and isinstance(cut, int)
        if cut > declines:
            raise malformed(f"{what}: more cut than declines")
        return cls(_vector(obj.get("total"), n_params, f"{what} vector"), float(weight), count, declines,
                   cut, dict(dropped))  # fmt: skip


def noise_sigma(noise_multiplier: float, clip: float, n_params: int) -> tuple[float, float]:
    """(sigma, grid step) of the discrete Gaussian added to a sum of updates clipped to `clip`.

    A DA accepts an update's norm up to clip * (1 + NORM_SLACK) (float rounding), and rounding
    onto the grid can move each coordinate by up to one step, so one person's L2 influence is at
    most clip * (1 + NORM_SLACK) + sqrt(n_params) * step: sigma is z times that.
    """
    step = noise_multiplier * clip / GRID_FRACTION
    return noise_multiplier * (clip * (1 + NORM_SLACK) + math.sqrt(n_params) * step), step


def average(
    merged: UpdateSum,
    *,
    noise_multiplier: float | None,
    clip: float | None,
    cohort: int,
) -> FloatArray:
    """The round's average update from the merged sum: exact, or noised (DP-FedAvg)."""
    if noise_multiplier is None:
        if merged.weight <= 0:
            return np.zeros_like(merged.total)
        out: FloatArray = merged.total / merged.weight
        return out
    from dispers.protocol.aggregation.dp import Noise, add_noise

    assert clip is not None
    sigma, step = noise_sigma(noise_multiplier, clip, len(merged.total))
    noised = add_noise(merged.total, Noise("gaussian", sigma, step))
    result: FloatArray = noised / max(1, cohort)
    return result
