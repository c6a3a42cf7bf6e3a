"""Sealing and opening batches of boxes across worker processes.

One process cannot keep two cores busy with sealed boxes: libsodium releases the GIL for the
X25519 and XSalsa20-Poly1305 work, but every box still takes the GIL before and after it, so
threads that seal and open in one process queue for it. A `CryptoPool` hands whole batches to
worker processes instead, which do nothing else: the callers' Python and the boxes run on
different cores.

A pool is installed process-wide (`use_pool`) by whoever runs the actors (the simulation's
driver); `Opener.open_many` and `seal_many` (dispers.crypto.box) use it for batches of at
least `MIN_ITEMS`, and do the work in place otherwise. What a worker opens goes back to the
actor's process, which notifies the observers there, as if it had opened it itself: a worker
registers none. A worker holds an actor's private key only for the call that needs it (it
comes with the batch), and keeps nothing between calls but the boxes it built for those keys.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

import nacl.exceptions
import nacl.public

MIN_ITEMS = 64  # fewer boxes are opened in place: shipping them costs more than it saves
CHUNK = 256  # boxes per task: batches are split so that every worker gets a share

_boxes: dict[bytes, nacl.public.SealedBox[nacl.public.PrivateKey]] = {}  # in a worker: by key


def _open_chunk(private: bytes, ciphertexts: Sequence[bytes]) -> list[bytes | None]:
    box = _boxes.get(private)
    if box is None:
        box = _boxes[private] = nacl.public.SealedBox(nacl.public.PrivateKey(private))
    out: list[bytes | None] = []
    for c in ciphertexts:
        try:
            out.append(bytes(box.decrypt(c)))
        except nacl.exceptions.CryptoError:
            out.append(None)
    return out


def _seal_chunk(public: bytes, plaintexts: Sequence[bytes]) -> list[bytes]:
    box = nacl.public.SealedBox(nacl.public.PublicKey(public))
    return [bytes(box.encrypt(p)) for p in plaintexts]


def _warm() -> int:
    return os.getpid()


class CryptoPool:
    """Worker processes that seal and open batches of boxes (spawned: no inherited state)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a crypto pool needs at least one worker")
        self.workers = workers
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        # Start every worker now (each imports PyNaCl once), not during the first batches.
        for f in [self._pool.submit(_warm) for _ in range(workers)]:
            f.result()

    def pids(self) -> list[int]:
        """The workers' process ids (for the simulation's memory and CPU accounting)."""
        return [p.pid for p in self._pool._processes.values() if p.pid is not None]  # noqa: SLF001

    def open_many(self, private: bytes, ciphertexts: Sequence[bytes]) -> list[bytes | None]:
        """Each box opened with `private` (None where it does not open), in order."""
        return _joined(
            [
                self._pool.submit(_open_chunk, private, list(ciphertexts[i : i + CHUNK]))
                for i in range(0, len(ciphertexts), CHUNK)
            ]  # fmt: skip
        )

    def seal_many(self, public: bytes, plaintexts: Sequence[bytes]) -> list[bytes]:
        """Each plaintext sealed to `public`, in order."""
        return _joined(
            [
                self._pool.submit(_seal_chunk, public, list(plaintexts[i : i + CHUNK]))
                for i in range(0, len(plaintexts), CHUNK)
            ]  # fmt: skip
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _joined(futures: list[Future[list[bytes]]] | list[Future[list[bytes | None]]]) -> list:  # type: ignore[type-arg]
    out: list = []  # type: ignore[type-arg]
    for f in futures:
        out.extend(f.result())
    return out


_active: CryptoPool | None = None


def active_pool() -> CryptoPool | None:
    """The pool installed in this process, if any."""
    return _active


@contextmanager
def use_pool(pool: CryptoPool | None) -> Iterator[None]:
    """Install `pool` for this process while the block runs (None: none)."""
    global _active
    previous, _active = _active, pool
    try:
        yield
    finally:
        _active = previous
