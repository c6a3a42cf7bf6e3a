"""`dispers simulate`: the real protocol objects over a population held as numpy columns in shards.

The Conductor, CI, TF, T, the DAs and the Querier are the protocol objects of the services,
in this process, over a metered in-process transport (:mod:`dispers.simulation.transport`);
each personal-cloud host is the real host object inside a shard (a worker process, or a Ray
actor), over its instances' columns. The driver relays each host's signed subscription batches
to the Conductor, several batches in flight at once, then submits the scenario's query as the
Querier, and compares what is released with the ground truth each shard computed.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import resource
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.spec import QuerySpec
from dispers.crypto import observe
from dispers.crypto.box import set_crypto
from dispers.crypto.keyfiles import read_key_file
from dispers.crypto.pool import CryptoPool, use_pool
from dispers.protocol.api import ConductorAPI, QuerierAPI
from dispers.protocol.assemble import Closer, assemble_actor
from dispers.protocol.conductor import Conductor, run_inline
from dispers.simulation.backends import ShardBackend, make_backend
from dispers.simulation.ground_truth import GroupTruth
from dispers.simulation.report import SimulationReport, group_errors
from dispers.simulation.scenario import Scenario
from dispers.simulation.shard import ShardSpec, ShardTruth, assign_blocks, block_sizes
from dispers.simulation.transport import Meter, ShardHost, SimPeers, _Metered

log = logging.getLogger(__name__)

CRYPTO_MODES = ("real", "off")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_INDEX = re.compile(r" \d+")


def default_shards() -> int:
    """One shard per core."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def scaled_settings(instances: int, scenario: Scenario) -> dict[str, float]:
    """Deadlines that grow with the work instead of fixed ones: a query's age limit and the DAs'
    state lifetime get 3 ms per instance on top of their defaults (600 s and 300 s)."""
    extra = 0.003 * instances
    return {
        "max_query_age_s": 600.0 + extra,
        "query_timeout_s": 300.0 + extra,
        "host_deadline_s": float(scenario.host_deadline_s),
    }


_CRYPTO_LOCK = threading.Lock()


@contextmanager
def _crypto(real: bool) -> Iterator[None]:
    # One simulation at a time in a process: the switch is process-wide, and two overlapping
    # simulations restoring it in the wrong order could leave the process sealing in clear.
    with _CRYPTO_LOCK:
        set_crypto(real)
        try:
            yield
        finally:
            set_crypto(True)


@contextmanager
def _observed() -> Iterator[Counter[tuple[str, str]]]:
    # Called for every box opened in this process, from many threads: each thread counts in its
    # own Counter (no lock per box), and the counters are summed when the block ends.
    seen: Counter[tuple[str, str]] = Counter()
    counters: list[Counter[tuple[str, str]]] = []
    mine = threading.local()
    lock = threading.Lock()

    def count(actor: str, what: str, plaintext: bytes) -> None:
        try:
            counter = mine.counter
        except AttributeError:
            counter = mine.counter = Counter()
            with lock:
                counters.append(counter)
        counter[(actor, what)] += 1

    observe.add_observer(count)
    try:
        yield seen
    finally:
        observe.remove_observer(count)
        with lock:
            for counter in counters:
                for (actor, what), n in counter.items():
                    seen[(actor, _INDEX.sub("", what))] += n


def _rss(pid: int) -> int | None:
    """A process's resident memory in bytes, or None where /proc does not show it."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _cpu_seconds(pid: int) -> float:
    """A process's user and system CPU seconds so far (0 where /proc does not show it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _local_pids(places: list[tuple[str, int]]) -> list[int] | None:
    """The shards' process ids if every shard runs on this machine, else None (a Ray cluster's
    workers elsewhere: a local process of the same id is not theirs)."""
    here = socket.gethostname()
    return [int(pid) for host, pid in places] if all(host == here for host, _ in places) else None


class _MemorySampler:
    """The resident memory of the driver and its shards, summed at the same instants (every
    `every` seconds): the whole simulation's peak, where the sum of each process's own peak
    adds peaks reached at different times (a shard peaks while it builds its columns, the
    driver at the end of subscription). Shards on other machines (a remote Ray cluster) are
    not visible here: then only the sum of peaks is reported."""

    def __init__(self, pids: list[int] | None, every: float = 0.25) -> None:
        self._pids = [os.getpid(), *(pids or [])]
        self.visible = pids is not None and all(_rss(p) is not None for p in self._pids)
        self.peak = 0
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        total = 0
        for pid in self._pids:
            total += _rss(pid) or 0
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def start(self) -> None:
        """Sample now, then every `every` seconds until stop()."""
        if self.visible:
            self.sample()
            self._thread.start()

    def stop(self) -> None:
        """Stop sampling (after a last sample); calling it again does nothing."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.sample()


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="inst", unit_scale=True, leave=True)


@dataclass
class _Cluster:
    config: ClusterConfig
    actors: dict[str, object]
    closers: list[Closer]
    meter: Meter

    @property
    def conductor(self) -> Conductor:
        return cast(Conductor, self.actors["conductor"])

    def querier(self) -> tuple[str, QuerierAPI]:
        name = self.config.roster.by_role(Role.QUERIER)[0].name
        return name, cast(QuerierAPI, _Metered(self.actors[name], name, name, Meter()))

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def _central_actors(
    config: ClusterConfig, backend: ShardBackend, on_answer: Callable[[int], None]
) -> _Cluster:
    meter = Meter()
    actors: dict[str, object] = {}
    closers: list[Closer] = []
    for entry in sorted(config.roster, key=lambda e: e.role is not Role.CONDUCTOR):
        if entry.role is Role.PERSONAL_CLOUD:
            continue
        actors[entry.name] = assemble_actor(
            config, entry.name, SimPeers(entry.name, actors, meter), run_inline, closers
        )
    for s, entry in enumerate(config.roster.by_role(Role.PERSONAL_CLOUD)):
        actors[entry.name] = ShardHost(backend, s, on_answer)
    return _Cluster(config, actors, closers, meter)


def _shard_specs(config: ClusterConfig, scenario: Scenario, shards: int, crypto: bool) -> list[ShardSpec]:
    n_blocks = len(block_sizes(scenario.instances))
    runs = assign_blocks(n_blocks, shards)
    specs = []
    for s, entry in enumerate(config.roster.by_role(Role.PERSONAL_CLOUD)):
        key_file = config.local_for(entry.name).key_file
        assert key_file is not None
        keys = read_key_file(key_file)
        specs.append(
            ShardSpec(
                index=s,
                host=entry.name,
                sealing_private=keys.sealing.private_bytes(),
                signing_seed=keys.signing.seed(),
                secret=keys.secret,
                roster=config.roster,
                settings=config.settings,
                blocks=tuple(runs[s]),
                n_instances=scenario.instances,
                seed=scenario.seed,
                query=scenario.spec,
                faults=scenario.faults,
                crypto=crypto,
            )
        )
    return specs


def _subscribe(
    cluster: _Cluster, backend: ShardBackend, sizes: list[int], batch: int, inflight: int, progress: bool
) -> int:
    """Relay every shard's subscription batches to the Conductor, `inflight` batches at once."""
    hosts = [e.name for e in cluster.config.roster.by_role(Role.PERSONAL_CLOUD)]
    jobs = []
    for start in range(0, max(sizes), batch):  # round robin: every shard sealing at once
        for s, size in enumerate(sizes):
            if start < size:
                jobs.append((s, start, min(size, start + batch)))
    conductor = cluster.conductor

    def run(job: tuple[int, int, int]) -> int:
        s, start, stop = job
        signed = backend.call(s, "subscription_batch", start, stop).result()
        as_host = cast(ConductorAPI, _Metered(conductor, hosts[s], "conductor", cluster.meter))
        applied = as_host.subscribe(signed)
        backend.call(s, "confirm", start, stop).result()
        return int(applied)

    total = 0
    with _progress(progress, sum(sizes), "subscribe") as bar, ThreadPoolExecutor(inflight) as pool:
        for applied in pool.map(run, jobs):
            total += applied
            if bar is not None:
                bar.update(applied)
    return total


def _truth(shards: list[ShardTruth], spec: QuerySpec) -> tuple[dict[str, Any], dict[str, int]]:
    labels = spec.groups
    value = np.concatenate([t.value for t in shards])
    group = np.concatenate([t.group for t in shards]).astype(np.int64)
    eligible = np.concatenate([t.eligible for t in shards])
    offline = np.concatenate([t.offline for t in shards])
    declining = np.concatenate([t.declining for t in shards])
    oob = np.concatenate([t.out_of_bounds for t in shards])
    answering = eligible & ~offline & ~declining & ~oob
    answered = value
    if spec.out_of_bounds == "clip":  # the DAs count the out-of-bounds values at the upper bound
        answering = eligible & ~offline & ~declining
        answered = np.where(oob, spec.bounds[1], value)
    truth: dict[str, Any] = {}
    for g, label in enumerate(labels):
        truth[label] = {
            "everyone": GroupTruth.of(value[eligible & (group == g)]),
            "answering": GroupTruth.of(answered[answering & (group == g)]),
        }
    counts = {
        "eligible": int(eligible.sum()),
        "answering": int(answering.sum()),
        "offline": int((eligible & offline).sum()),
        "declining": int((eligible & declining & ~offline).sum()),
        "out_of_bounds": int((eligible & oob & ~offline & ~declining).sum()),
    }
    return truth, counts


def simulate(
    scenario: Scenario,
    *,
    shards: int | None = None,
    backend: str = "local",
    crypto: str = "real",
    address: str | None = None,
    inflight: int | None = None,
    progress: bool = False,
    num_cpus: int | None = None,
    crypto_workers: int | None = None,
) -> SimulationReport:
    """Run the scenario's population and query through the protocol; return the report.

    `crypto_workers`: worker processes on the driver's machine that seal and open the central
    actors' batches of boxes (dispers.crypto.pool). Default: one per core when the shards run on
    a Ray cluster elsewhere (`address`), with crypto real; else none (the driver's threads).
    """
    if crypto not in CRYPTO_MODES:
        raise DispersError(ErrorCode.CONFIG, f"unknown crypto mode {crypto!r}; expected real or off")
    n_shards = default_shards() if shards is None else shards
    if n_shards < 1:
        raise DispersError(ErrorCode.CONFIG, "--shards must be at least 1")
    assign_blocks(len(block_sizes(scenario.instances)), n_shards)  # refuses too many shards early
    if inflight is not None and inflight < 1:
        raise DispersError(ErrorCode.CONFIG, "--inflight must be at least 1")
    real = crypto == "real"
    if crypto_workers is not None and (isinstance(crypto_workers, bool) or crypto_workers < 0):
        raise DispersError(ErrorCode.CONFIG, "--crypto-workers must be 0 or more")
    # By default only when the shards run elsewhere (a Ray cluster's address): on one machine
    # the shard processes already keep the cores busy, and workers only add copies and memory.
    remote = backend == "ray" and address is not None
    n_workers = (default_shards() if real and remote else 0) if crypto_workers is None else crypto_workers
    answered = [0]
    bar_holder: list[Any] = [None]
    lock = threading.Lock()

    def on_answer(n: int) -> None:
        with lock:
            answered[0] += n
            if bar_holder[0] is not None:
                bar_holder[0].update(n)

    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the driver's CPU seconds per phase: above the wall time, it used both cores
    runner = make_backend(backend, address=address, num_cpus=num_cpus)
    with (
        tempfile.TemporaryDirectory(prefix="dispers-sim-") as tmp,
        _crypto(real),
        _observed() as seen,
        ExitStack() as pool_scope,
    ):
        config = write_cluster(
            Path(tmp),
            ClusterLayout(
                leaf_aggregators=scenario.leaf_aggregators,
                hosts=tuple(f"pc-{s}" for s in range(n_shards)),
                k_min=scenario.k_min,
                batch_size=scenario.batch_size,
                backend="memory",
                host_as_of=scenario.spec.as_of,
                insecure=True,
                dp=scenario.dp,
                extra_settings=scaled_settings(scenario.instances, scenario),
            ),
        )
        cluster = _central_actors(config, runner, on_answer)
        sampler: _MemorySampler | None = None
        populate_peak = 0
        pool: CryptoPool | None = None
        try:
            if n_workers and real:
                pool = CryptoPool(n_workers)
                pool_scope.enter_context(use_pool(pool))
            start, cpu_start = time.perf_counter(), time.process_time()
            runner.start(_shard_specs(config, scenario, n_shards, real))
            sizes = [int(f.result()) for f in [runner.call(s, "ready") for s in range(n_shards)]]
            phases["populate"] = time.perf_counter() - start
            cpu["populate"] = time.process_time() - cpu_start
            # While they build their columns the shards peak and the driver holds little: the
            # populate phase's total is each shard's peak so far plus the driver's present size.
            built = [runner.call(s, "usage").result() for s in range(n_shards)]
            populate_peak = (_rss(os.getpid()) or 0) + sum(int(u["peak_rss"]) for u in built)
            places = [runner.call(s, "where").result() for s in range(n_shards)]
            local = _local_pids(places)
            sampler = _MemorySampler(None if local is None else [*local, *(pool.pids() if pool else [])])
            sampler.start()

            start, cpu_start = time.perf_counter(), time.process_time()
            subscribed = _subscribe(
                cluster, runner, sizes, config.settings.batch_size, inflight or max(2, n_shards), progress
            )
            phases["subscribe"] = time.perf_counter() - start
            cpu["subscribe"] = time.process_time() - cpu_start
            offline = sum(int(runner.call(s, "go_offline").result()) for s in range(n_shards))
            # What subscription built (TF's sets, T's directory) lives until the end: out of the
            # cyclic collector's way, so that its full collections during the query do not
            # walk a million pseudonyms each time.
            gc.freeze()

            start, cpu_start = time.perf_counter(), time.process_time()
            name, querier = cluster.querier()
            with _progress(progress, subscribed, "query") as bar:
                bar_holder[0] = bar
                try:
                    query_id = querier.submit(scenario.spec)
                    outcome = querier.outcome(query_id)
                finally:
                    bar_holder[0] = None
            phases["query"] = time.perf_counter() - start
            cpu["query"] = time.process_time() - cpu_start
            record = cluster.conductor.record(query_id)

            truth, truth_counts = _truth(
                [runner.call(s, "truth").result() for s in range(n_shards)], scenario.spec
            )
            sampler.stop()
            usage = [runner.call(s, "usage").result() for s in range(n_shards)]
            pool_cpu = [_cpu_seconds(pid) for pid in pool.pids()] if pool else []
        except (BrokenExecutor, OSError) as exc:
            raise DispersError(
                ErrorCode.UNAVAILABLE, f"a shard's worker failed ({type(exc).__name__}); see its log above"
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("ray"):  # an actor died, or Ray itself
                raise DispersError(
                    ErrorCode.UNAVAILABLE, f"a Ray shard failed ({type(exc).__name__})"
                ) from None
            raise
        finally:
            if sampler is not None:
                sampler.stop()
            gc.unfreeze()
            pool_scope.close()
            if pool is not None:
                pool.close()
            cluster.close()
            runner.close()
    opened: Counter[tuple[str, str]] = Counter(seen)
    for u in usage:
        for actor, what, n in u["opened"]:
            opened[(actor, _INDEX.sub("", what))] += n
    roles = {e.name: e.role.value for e in config.roster}
    learned: dict[str, dict[str, Any]] = {
        actor: {"role": role, "opened": {}} for actor, role in roles.items()
    }
    for (actor, what), n in sorted(opened.items()):
        learned.setdefault(actor, {"role": roles.get(actor, "?"), "opened": {}})["opened"][what] = n
    messages = cluster.meter.per_actor()
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampled_peak = sampler.peak if sampler is not None and sampler.visible else 0
    shard_peaks = [int(u["peak_rss"]) for u in usage]
    result = outcome.result
    return SimulationReport(
        scenario=scenario.name,
        instances=scenario.instances,
        shards=n_shards,
        backend=backend,
        crypto=crypto,
        dp=scenario.dp,
        seed=scenario.seed,
        faults=scenario.faults,
        phases={
            **phases,
            **{f"query: {k}": v for k, v in record.phases.items()},
        },
        state=record.state,
        error=None if record.error_code is None else f"{record.error_code}: {record.error_message}",
        result=result,
        truth=truth,
        errors={}
        if result is None
        else group_errors(result, truth, scenario.spec.fields[0].name if scenario.spec.fields else None),
        counts={
            "subscribed": subscribed,
            "offline_instances": offline,
            "answers_from_hosts": answered[0],
            **{f"conductor: {k}": v for k, v in record.counts.items()},
            **{f"truth: {k}": v for k, v in truth_counts.items()},
        },
        messages=messages,
        busy=cluster.meter.busy_seconds(),
        driver_cpu=cpu,
        shard_cpu=[float(u["cpu_s"]) for u in usage],
        crypto_workers=n_workers if real else 0,
        pool_cpu=pool_cpu,
        memory={
            "driver_peak_bytes": main_peak,
            "shard_peak_bytes": shard_peaks,
            "sum_of_peaks_bytes": main_peak + sum(shard_peaks),
            # At the same instants where the shards' memory is visible here; else the sum of peaks.
            "total_peak_bytes": (
                max(populate_peak, sampled_peak) if sampled_peak else main_peak + sum(shard_peaks)
            ),
            "total_peak_sampled": bool(sampled_peak),
        },  # fmt: skip
        learned=learned,
        querier=name,
    )
