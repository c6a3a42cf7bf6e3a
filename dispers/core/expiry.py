"""Timers without a thread each: one daemon thread per process runs every scheduled callback.

`threading.Timer` starts a thread per timer; an aggregator arms one per query or round, so a
busy process paid a thread start (and its first GIL hand-off) per call. `schedule` keeps the
deadlines in a heap that one thread waits on, started on first use.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Timer:
    """A scheduled callback; `cancel` stops it if it has not run (idempotent)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Expiry:
    """Runs callbacks after their delays, one after another, on one daemon thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer, Callable[[], object]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Run `callback` once, `delay` seconds from now, unless the returned timer is cancelled.
        Callbacks should be quick (they share the thread); one that raises is logged."""
        timer = Timer()
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), timer, callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dispers-expiry", daemon=True)
                self._thread.start()
            self._wake.notify()
        return timer

    def pending(self) -> int:
        """Callbacks scheduled and neither run nor cancelled."""
        with self._wake:
            return sum(1 for _, _, t, _ in self._heap if not t.cancelled)

    def _run(self) -> None:
        while True:
            with self._wake:
                # Cancelled timers leave the heap as soon as they reach its top.
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                due = self._heap[0][0] - time.monotonic()
                if due > 0:
                    self._wake.wait(due)
                    continue
                _, _, timer, callback = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            timer.cancelled = True  # it ran: a later cancel is a no-op
            try:
                callback()
            except Exception:  # noqa: BLE001  (one callback's failure must not stop the others)
                log.exception("a scheduled expiry failed")


EXPIRY = Expiry()
"""The process's one expiry thread."""
