"""The one hook every opened plaintext passes through (DESIGN.md invariant 2)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

Observer = Callable[[str, str, bytes], None]

_lock = threading.Lock()
# Replaced whole under _lock, read without it: notify, called on every opened box, takes no lock
# and copies nothing (a tuple is immutable; swapping the reference is atomic).
_observers: tuple[Observer, ...] = ()


@dataclass(frozen=True)
class Seen:
    """One plaintext obtained by one actor."""

    actor: str
    what: str
    plaintext: bytes


def add_observer(observer: Observer) -> None:
    """Register a callable(actor, what, plaintext) called on every opened box."""
    global _observers
    with _lock:
        _observers = (*_observers, observer)


def remove_observer(observer: Observer) -> None:
    """Unregister an observer."""
    global _observers
    with _lock:
        current = list(_observers)
        current.remove(observer)
        _observers = tuple(current)


def notify(actor: str, what: str, plaintext: bytes) -> None:
    """Called by crypto.box for every plaintext it hands to an actor."""
    for observer in _observers:
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
