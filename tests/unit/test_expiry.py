"""The process's one expiry thread: callbacks run after their delays, in deadline order, once."""

from __future__ import annotations

import threading
import time

from dispers.core.expiry import Expiry


def test_callbacks_run_in_deadline_order_and_cancelled_ones_never_run() -> None:
    expiry = Expiry()
    ran: list[str] = []
    done = threading.Event()
    expiry.schedule(0.15, lambda: ran.append("late"))
    dropped = expiry.schedule(0.05, lambda: ran.append("cancelled"))
    expiry.schedule(0.02, lambda: ran.append("early"))
    expiry.schedule(0.25, done.set)
    dropped.cancel()
    assert expiry.pending() == 3
    assert done.wait(5)
    assert ran == ["early", "late"]
    assert expiry.pending() == 0


def test_a_callback_is_not_run_before_its_delay_and_one_that_raises_stops_nothing() -> None:
    expiry = Expiry()
    start = time.monotonic()
    at: list[float] = []
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("a bug in one expiry")

    expiry.schedule(0.01, boom)
    expiry.schedule(0.2, lambda: (at.append(time.monotonic() - start), done.set()))
    assert done.wait(5)
    assert at[0] >= 0.2


def test_one_thread_serves_every_timer() -> None:
    expiry = Expiry()
    before = threading.active_count()
    timers = [expiry.schedule(60, lambda: None) for _ in range(200)]
    assert threading.active_count() <= before + 1
    for t in timers:
        t.cancel()
    assert expiry.pending() == 0
