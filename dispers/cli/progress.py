"""Progress bars for the long steps, on a terminal only: piped or redirected, the CLI stays quiet."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm


def on_terminal(stream: IO[str] | None = None) -> bool:
    """Whether `stream` (stderr by default) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(total: float | None = None, *, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm[Any]:
    """A tqdm bar on stderr, disabled (silent, free) unless stderr is a terminal."""
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, disable=not on_terminal(),
        leave=False, dynamic_ncols=True, **kwargs,
    )  # fmt: skip


class Spinner:
    """A step of unknown length on a terminal: its description and the time it has taken."""

    def __init__(self, progress: tqdm[Any]) -> None:
        self._bar = progress

    def describe(self, text: str) -> None:
        """Change what the step says it is doing."""
        self._bar.set_description_str(text, refresh=True)


@contextmanager
def spinner(desc: str) -> Iterator[Spinner]:
    """Show `desc` and the elapsed time, refreshed twice a second, while the block runs."""
    progress = bar(desc=desc, bar_format="{desc} {elapsed}")
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            progress.refresh()

    thread = None
    if not progress.disable:
        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
    try:
        yield Spinner(progress)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        progress.close()


@contextmanager
def polled(desc: str, total: int, read: Callable[[], int | None], *, every_s: float = 0.5) -> Iterator[None]:
    """A bar of `total` whose position is `read()`, polled while the block runs (a count another
    process advances, such as a host's subscribed instances); a None reading is skipped."""
    progress = bar(total, desc=desc, unit="instances")
    stop = threading.Event()

    def show() -> None:
        value = read()
        if value is not None:
            progress.n = max(0, min(total, value))
            progress.refresh()

    def poll() -> None:
        while not stop.wait(every_s):
            show()

    thread = None
    if not progress.disable:
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
    try:
        yield
        if not progress.disable:
            show()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        progress.close()


def elapsed(start: float) -> str:
    """Seconds since `start` (a perf_counter reading), for a closing line."""
    return f"{time.perf_counter() - start:.1f} s"
