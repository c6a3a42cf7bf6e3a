"""Sums of float64 vectors that do not depend on how the terms were split or ordered.

Float addition is not associative: shards summing their own updates, then the driver summing
the shards' partials, would give a total that changes in its last bits with the number of
shards, and a trained model that drifts with it. A `FixedSum` rounds each term once, on its
own, onto a fixed binary grid (three int64 limbs: the integer part, then 40 and 40 more bits
of fraction, so an absolute rounding of at most 2^-81 per term), and adds the limbs as
integers: exactly, so any split of the terms, summed in any order, gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
FRACTION_BITS = 40  # per fractional limb
MAX_MAGNITUDE = 2.0**40  # a term's coordinates must be below this in magnitude
MAX_TERMS = 2**22  # limbs below 2^40, so this many terms fit an int64 sum with room to spare
_SCALE = 2.0**FRACTION_BITS


@dataclass
class FixedSum:
    """A sum of `terms` vectors of `n` values, held exactly as three int64 limbs per value."""

    limbs: IntArray  # (3, n): integer part, then two fractional limbs of 40 bits (signed)
    terms: int = 0

    @classmethod
    def empty(cls, n: int) -> FixedSum:
        """The sum of nothing."""
        return cls(np.zeros((3, n), dtype=np.int64))

    def add(self, rows: FloatArray) -> None:
        """Add each row of `rows` (shape (k, n)), each value rounded once onto the grid."""
        rows = np.asarray(rows, dtype=np.float64)
        if not len(rows):
            return
        if not np.isfinite(rows).all() or np.abs(rows).max() >= MAX_MAGNITUDE:
            raise DispersError(
                ErrorCode.INTERNAL,
                "an update holds a non-finite value or one beyond 2^40 (training diverged?)",
            )
        self._count(len(rows))
        # Truncation keeps each difference below exact: it only drops a value's top bits.
        whole = np.trunc(rows)
        frac = (rows - whole) * _SCALE
        high = np.trunc(frac)
        low = np.rint((frac - high) * _SCALE)
        self.limbs += np.stack([whole, high, low]).astype(np.int64).sum(axis=1)

    def merge(self, other: FixedSum) -> None:
        """Add another sum of the same length (exact: any tree of merges gives the same bits)."""
        self._count(other.terms)
        self.limbs += other.limbs

    def value(self) -> FloatArray:
        """The sum as float64, each value correctly rounded from the exact limbs."""
        one = 2 ** (2 * FRACTION_BITS)
        exact = [
            (int(a) * one + int(b) * 2**FRACTION_BITS + int(c)) / one
            for a, b, c in zip(self.limbs[0], self.limbs[1], self.limbs[2], strict=True)
        ]
        return np.array(exact, dtype=np.float64)

    def _count(self, more: int) -> None:
        if self.terms + more > MAX_TERMS:
            raise DispersError(ErrorCode.CONFIG, f"more than {MAX_TERMS} updates in one round's sum")
        self.terms += more
