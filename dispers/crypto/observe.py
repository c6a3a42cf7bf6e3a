"""The one hook every opened plaintext passes through (DESIGN.md invariant 2)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

Observer = Callable[[str, str, bytes], None]

_lock = threading.Lock()
_observers: list[Observer] = []


@dataclass(frozen=True)
class Seen:
    """One plaintext obtained by one actor."""

    actor: str
    what: str
    plaintext: bytes


def add_observer(observer: Observer) -> None:
    """Register a callable(actor, what, plaintext) called on every opened box."""
    with _lock:
        _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    """Unregister an observer."""
    with _lock:
        _observers.remove(observer)


def notify(actor: str, what: str, plaintext: bytes) -> None:
    """Called by crypto.box for every plaintext it hands to an actor."""
    if not _observers:
        return
    with _lock:
        current = list(_observers)
    for observer in current:
        observer(actor, what, plaintext)


@contextmanager
def recording() -> Iterator[list[Seen]]:
    """Collect every plaintext opened inside the block (tests use this for canaries)."""
    seen: list[Seen] = []
    lock = threading.Lock()

    def record(actor: str, what: str, plaintext: bytes) -> None:
        with lock:
            seen.append(Seen(actor, what, plaintext))

    add_observer(record)
    try:
        yield seen
    finally:
        remove_observer(record)
