"""Per-batch cost of TF's pseudonym sets and T's directory as they grow to 10 million.

Fills the in-memory stores the simulation uses (`MemoryPseudonymSets.subscribe_batch`,
`MemoryAddressDirectory.commit_batch`) with batches of 1,000 random 32-byte pseudonyms (each in
an age bracket of 5, a sex of 2 and `has:heart_rate` for 80%, so about 2.8 memberships each; the
address `pc-1/b00000-i0000000`-like), timing every batch in CPU time (`time.process_time`:
other work on a shared machine stretches wall-clock time far more), and prints the mean
per-batch time of each tenth of the fill and the last tenth over the first: flat means about 1.
With `--sqlite`,
the SQLite stores too, on a temporary file, up to `--sqlite-n` (they slow down as they grow).
Run: `python benchmarks/bench_state.py [--n 10000000]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dispers.state.directory import AddressDirectory, MemoryAddressDirectory, SQLiteAddressDirectory
from dispers.state.pseudonyms import MemoryPseudonymSets, PseudonymSets, SQLitePseudonymSets

BATCH = 1000
TOKENS = [os.urandom(32) for _ in range(8)]  # 5 age brackets, 2 sexes, has:heart_rate


def batches(n: int, seed: int = 1) -> Callable[[int], tuple[list[bytes], list[list[bytes]], list[str]]]:
    rng = np.random.default_rng(seed)

    def make(b: int) -> tuple[list[bytes], list[list[bytes]], list[str]]:
        raw = rng.bytes(32 * BATCH)
        pseudonyms = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        age = rng.integers(0, 5, BATCH)
        sex = rng.integers(5, 7, BATCH)
        has = rng.random(BATCH) < 0.8
        tokens = [
            [TOKENS[a], TOKENS[s], *([TOKENS[7]] if h else [])] for a, s, h in zip(age, sex, has, strict=True)
        ]
        addresses = [f"pc-1/b{b:05d}-i{i:07d}" for i in range(BATCH)]
        return pseudonyms, tokens, addresses

    return make


def fill(n: int, sets: PseudonymSets, directory: AddressDirectory) -> tuple[list[float], list[float]]:
    """Seconds per batch, for the sets and for the directory."""
    make = batches(n)
    tf, t = [], []
    for b in range(n // BATCH):
        pseudonyms, tokens, addresses = make(b)
        start = time.process_time()
        sets.subscribe_batch(f"{b:064x}", list(zip(tokens, pseudonyms, strict=True)))
        tf.append(time.process_time() - start)
        start = time.process_time()
        directory.commit_batch(f"{b:064x}", list(zip(pseudonyms, addresses, strict=True)), [])
        t.append(time.process_time() - start)
    return tf, t


def show(name: str, n: int, per_batch: list[float]) -> None:
    tenths = np.array_split(np.array(per_batch) * 1000, 10)
    means = [float(x.mean()) for x in tenths]
    print(f"{name} up to {n:,}: CPU ms per batch of {BATCH:,}, by tenth of the fill: "
          + " ".join(f"{m:.2f}" for m in means) + f"; last / first = {means[-1] / means[0]:.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--sqlite-n", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    tf, t = fill(args.n, MemoryPseudonymSets(), MemoryAddressDirectory())
    show("TF memory sets", args.n, tf)
    show("T memory directory", args.n, t)
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            tf, t = fill(
                args.sqlite_n,
                SQLitePseudonymSets(str(Path(tmp) / "tf.sqlite")),
                SQLiteAddressDirectory(str(Path(tmp) / "t.sqlite")),
            )
        show("TF SQLite sets", args.sqlite_n, tf)
        show("T SQLite directory", args.sqlite_n, t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
