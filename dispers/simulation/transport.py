"""The simulation's in-process transport: the protocol objects called directly, every call metered.

Like :mod:`dispers.transport.local`, each call carries its caller's name; on top, each call is
counted as two messages (request and answer) with their sizes, per actor, and a call to a
personal-cloud host goes to the shard that holds it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, cast

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.messages import ContributionBatch, ContributionRequest
from dispers.protocol.api import (
    ConceptIndexorAPI,
    ConductorAPI,
    DataAggregatorAPI,
    PersonalCloudAPI,
    TargetAPI,
    TargetFinderAPI,
)
from dispers.simulation.backends import ShardBackend


def wire_size(obj: object) -> int:
    """Bytes a message would carry: its byte strings and text, 8 per number (an estimate of a
    protobuf's size, without field tags)."""
    if isinstance(obj, bytes | bytearray):
        return len(obj)
    if isinstance(obj, str):
        return len(obj)
    if obj is None or isinstance(obj, bool | int | float):
        return 8
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(wire_size(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, tuple | list | set | frozenset):
        return sum(len(x) if type(x) is bytes else wire_size(x) for x in obj)
    if isinstance(obj, Mapping):
        return sum(wire_size(k) + wire_size(v) for k, v in obj.items())
    return 0


class Meter:
    """Messages and bytes each actor sent and received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])  # actor -> [messages, bytes]
        self.received: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.busy: defaultdict[str, float] = defaultdict(float)  # "callee.operation" -> seconds

    def call(
        self, caller: str, callee: str, request: int, answer: int, op: str = "", seconds: float = 0.0
    ) -> None:
        """One call: a request from caller to callee and an answer back (and how long it took)."""
        with self._lock:
            if op:
                self.busy[f"{callee}.{op}"] += seconds
            for book, actor, size in (
                (self.sent, caller, request),
                (self.received, callee, request),
                (self.sent, callee, answer),
                (self.received, caller, answer),
            ):
                book[actor][0] += 1
                book[actor][1] += size

    def busy_seconds(self) -> dict[str, float]:
        """Wall-clock seconds inside each operation ("actor.operation"), summed over calls
        (nested calls count in both: T's collect includes the hosts' answers)."""
        with self._lock:
            return dict(sorted(self.busy.items(), key=lambda kv: -kv[1]))

    def per_actor(self) -> dict[str, dict[str, int]]:
        """actor -> messages and bytes sent and received."""
        with self._lock:
            actors = sorted(set(self.sent) | set(self.received))
            return {
                a: {
                    "messages_sent": self.sent[a][0],
                    "bytes_sent": self.sent[a][1],
                    "messages_received": self.received[a][0],
                    "bytes_received": self.received[a][1],
                }
                for a in actors
            }


class _Metered:
    """An actor as one caller reaches it: each operation gets the caller's name and is metered."""

    def __init__(self, actor: object, caller: str, callee: str, meter: Meter) -> None:
        self._actor = actor
        self._caller = caller
        self._callee = callee
        self._meter = meter

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self._actor, name)
        if name.startswith("_") or not callable(attr):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            answer = attr(self._caller, *args, **kwargs)
            seconds = time.perf_counter() - start
            self._meter.call(
                self._caller, self._callee, wire_size((args, kwargs)), wire_size(answer), name, seconds
            )
            return answer

        return call


class ShardHost:
    """A personal-cloud host that lives in a shard: T's requests go to the shard's worker."""

    def __init__(
        self, backend: ShardBackend, shard: int, on_answer: Callable[[int], None] | None = None
    ) -> None:
        self._backend = backend
        self._shard = shard
        self._on_answer = on_answer

    def contribute(self, caller: str, request: ContributionRequest) -> ContributionBatch:
        """Ask the shard's host (in its worker) to answer T."""
        batch: ContributionBatch = self._backend.call(self._shard, "contribute", caller, request).result()
        if self._on_answer is not None:
            self._on_answer(len(request.instance_ids))
        return batch


class SimPeers:
    """How one actor reaches the others in a simulation (implements :class:`Peers`)."""

    def __init__(self, caller: str, actors: Mapping[str, object], meter: Meter) -> None:
        self._caller = caller
        self._actors = actors
        self._meter = meter

    def _to(self, name: str) -> Any:
        actor = self._actors.get(name)
        if actor is None:
            raise DispersError(ErrorCode.UNAVAILABLE, f"no actor {name!r} in this simulation")
        return _Metered(actor, self._caller, name, self._meter)

    def conductor(self) -> ConductorAPI:
        """The Conductor."""
        return cast(ConductorAPI, self._to("conductor"))

    def concept_indexor(self) -> ConceptIndexorAPI:
        """The Concept Indexor."""
        return cast(ConceptIndexorAPI, self._to("ci"))

    def target_finder(self) -> TargetFinderAPI:
        """The Target Finder."""
        return cast(TargetFinderAPI, self._to("tf"))

    def target(self) -> TargetAPI:
        """The Target."""
        return cast(TargetAPI, self._to("t"))

    def data_aggregator(self, name: str) -> DataAggregatorAPI:
        """A Data Aggregator by name."""
        return cast(DataAggregatorAPI, self._to(name))

    def personal_cloud(self, name: str) -> PersonalCloudAPI:
        """A host by name (in a shard)."""
        return cast(PersonalCloudAPI, self._to(name))
