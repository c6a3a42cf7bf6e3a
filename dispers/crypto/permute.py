"""One uniformly random permutation from the OS's cryptographic source, vectorised.

Each position draws a 64-bit key from ``os.urandom`` and the positions are sorted by key (a
random-keys shuffle): one system call and one numpy sort for the whole list, instead of one
``SystemRandom`` call per element (3 s per million items measured before). Ties between
64-bit keys (probability about n^2 / 2^65: 3e-8 for a million) are broken by position, a bias
far below anything an observer could measure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")


def secure_permutation(n: int) -> npt.NDArray[np.int64]:
    """A random permutation of range(n), keyed by the OS's cryptographic random source."""
    if n <= 1:
        return np.arange(max(n, 0), dtype=np.int64)
    keys = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return np.argsort(keys, kind="stable").astype(np.int64)


def shuffled(items: Sequence[T]) -> list[T]:
    """The items in a new order drawn by :func:`secure_permutation`."""
    return [items[i] for i in secure_permutation(len(items)).tolist()]
