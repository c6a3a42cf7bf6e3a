"""Where shards run: local worker processes (one per shard) or Ray actors (one per shard).

A backend starts one worker per spec and calls methods of the shard it holds (by default a
:class:`dispers.simulation.shard.Shard` built from a :class:`ShardSpec`; training passes its
own shard class), answering a :class:`concurrent.futures.Future`. Never a process, an actor or
a task per instance.
"""

from __future__ import annotations

import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from dispers.core.errors import DispersError, ErrorCode
from dispers.simulation.shard import Shard

BACKENDS = ("local", "ray")

# What a worker builds its shard with: a picklable callable (a class) taking the spec.
ShardFactory = Callable[[Any], Any]

_shard: Any = None  # the shard of this worker process (local backend)


def _build(factory: ShardFactory, spec: Any) -> None:
    global _shard
    _shard = factory(spec)


def _call(method: str, args: tuple[Any, ...]) -> Any:
    if _shard is None:
        raise DispersError(ErrorCode.INTERNAL, "this worker holds no shard")
    return getattr(_shard, method)(*args)


class ShardBackend(ABC):
    """Runs the shards of one simulation."""

    @abstractmethod
    def start(self, specs: Sequence[Any], factory: ShardFactory = Shard) -> None:
        """Start one worker per spec; each builds its shard, `factory(spec)` (they build at once)."""

    @abstractmethod
    def call(self, shard: int, method: str, *args: Any) -> Future[Any]:
        """Call a method of shard `shard`; calls to one shard run one at a time, in order."""

    @abstractmethod
    def close(self) -> None:
        """Stop every worker."""


class LocalBackend(ShardBackend):
    """One worker process per shard on this machine (spawned, so no thread state is forked)."""

    def __init__(self) -> None:
        self._pools: list[ProcessPoolExecutor] = []

    def start(self, specs: Sequence[Any], factory: ShardFactory = Shard) -> None:
        """Start the processes; each builds its shard as its first task."""
        context = multiprocessing.get_context("spawn")
        for spec in specs:
            pool = ProcessPoolExecutor(
                max_workers=1, mp_context=context, initializer=_build, initargs=(factory, spec)
            )
            self._pools.append(pool)

    def call(self, shard: int, method: str, *args: Any) -> Future[Any]:
        """Submit the call to the shard's process."""
        return self._pools[shard].submit(_call, method, args)

    def close(self) -> None:
        """Stop the processes."""
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()


class _RayShard:
    """The Ray actor holding one shard."""

    def __init__(self, factory: ShardFactory, spec: Any) -> None:
        self._shard = factory(spec)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self._shard, method)(*args)


class RayBackend(ShardBackend):
    """One Ray actor per shard, on a running Ray cluster (``address``) or a local one it starts."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise DispersError(
                ErrorCode.CONFIG, "the ray backend needs Ray: pip install 'dispers[ray]'"
            ) from None
        self._ray = ray
        self._address = address
        self._num_cpus = num_cpus
        self._started_ray = False
        self._actors: list[Any] = []

    def start(self, specs: Sequence[Any], factory: ShardFactory = Shard) -> None:
        """Connect to (or start) Ray and create one actor per shard."""
        ray = self._ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self._address:
                kwargs["address"] = self._address
            else:
                kwargs["num_cpus"] = self._num_cpus
                # Ray waits 30 s for its control server by default: too short on a loaded machine.
                os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "180")
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DispersError(ErrorCode.UNAVAILABLE, f"cannot reach Ray: {str(exc)[:200]}") from None
            self._started_ray = True
        # One CPU each would stop more shards than cores from starting at all on a small
        # machine; a shard is mostly waiting on the driver, so each asks for a share.
        actor = ray.remote(num_cpus=0.5)(_RayShard)
        self._actors = [actor.remote(factory, spec) for spec in specs]

    def call(self, shard: int, method: str, *args: Any) -> Future[Any]:
        """Call the shard's actor."""
        future: Future[Any] = self._actors[shard].call.remote(method, *args).future()
        return future

    def close(self) -> None:
        """Kill the actors, and shut Ray down if this backend started it."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors.clear()
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False


def make_backend(name: str, *, address: str | None = None, num_cpus: int | None = None) -> ShardBackend:
    """The backend called `name` (local or ray)."""
    if name == "local":
        if address:
            raise DispersError(ErrorCode.CONFIG, "--address is for the ray backend")
        return LocalBackend()
    if name == "ray":
        return RayBackend(address, num_cpus)
    raise DispersError(ErrorCode.CONFIG, f"unknown backend {name!r}; expected local or ray")
