"""A shard: one worker holding tens of thousands of instances behind one personal-cloud host.

The population is generated in fixed blocks, each from its own seed derived from the
scenario's seed and the block's number, and a shard holds a contiguous run of blocks: the
population, and so the result, is the same whatever the number of shards. A shard's
instances are numpy columns (:class:`dispers.state.columns.ColumnStore`) behind the real
:class:`dispers.protocol.instance.host.PersonalCloudHost`, which seals every subscription and
contribution as it does in a service. Besides, each shard computes from the generated arrays,
with the independent reference code of :mod:`dispers.simulation.ground_truth`, what every
instance would contribute (the ground truth), and applies the scenario's faults.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import cast

import numpy as np
import numpy.typing as npt

from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.expression import And, Expr, Not, Ref, parse_positional
from dispers.core.messages import ContributionBatch, ContributionRequest, SubscriptionBatch, SubscriptionOp
from dispers.core.spec import QuerySpec
from dispers.core.vocabulary import AGE_BRACKETS, AGE_CONCEPTS, HAS_HEART_RATE
from dispers.crypto import observe
from dispers.crypto.box import set_crypto
from dispers.crypto.keys import ActorKeys, SealingKeyPair, SigningKeyPair
from dispers.protocol.api import ConductorAPI
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.simulation.ground_truth import group_field_values, local_values
from dispers.simulation.population import Population, PopulationSpec, generate
from dispers.simulation.scenario import Faults
from dispers.state.columns import Column, ColumnStore

BLOCK_MIN = 250
BLOCK_MAX = 10_000
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
_EPOCH = date(1970, 1, 1)


def block_size(n_instances: int) -> int:
    """Instances per generated block: a function of the population size only (never of the
    number of shards), at most 10,000, so 1,000,000 instances make 100 blocks."""
    return min(BLOCK_MAX, max(BLOCK_MIN, math.ceil(n_instances / 32)))


def block_sizes(n_instances: int) -> list[int]:
    """The size of each block, in order (the last one may be smaller)."""
    size = block_size(n_instances)
    return [min(size, n_instances - start) for start in range(0, n_instances, size)]


def block_seed(seed: int, block: int) -> int:
    """The seed of one block, derived from the scenario's seed."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint32)[0])


def assign_blocks(n_blocks: int, shards: int) -> list[range]:
    """Contiguous runs of blocks, one per shard, as even as can be."""
    if not 1 <= shards <= n_blocks:
        raise DispersError(
            ErrorCode.CONFIG,
            f"{shards} shards for {n_blocks} blocks of instances: use 1 to {n_blocks} shards",
        )
    return [range(s * n_blocks // shards, (s + 1) * n_blocks // shards) for s in range(shards)]


def measured_kind(function: str) -> str | None:
    """The measurement kind a registry function reads (``mean_heart_rate`` -> ``heart_rate``)."""
    if function == "age":
        return None
    return function.partition("_")[2] or None


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs to build its shard (picklable, sent once)."""

    index: int
    host: str
    sealing_private: bytes
    signing_seed: bytes
    secret: bytes
    roster: Roster
    settings: ClusterSettings
    blocks: tuple[int, ...]
    n_instances: int
    seed: int
    query: QuerySpec
    faults: Faults
    crypto: bool


@dataclass(frozen=True)
class ShardTruth:
    """Per instance of a shard, what the reference code says it holds, and its faults."""

    value: npt.NDArray[np.float64]  # the local value (NaN where none)
    group: npt.NDArray[np.int16]  # its group (-1: in none)
    eligible: npt.NDArray[np.bool_]  # a target that consents, has a value and falls in a group
    offline: npt.NDArray[np.bool_]
    declining: npt.NDArray[np.bool_]
    out_of_bounds: npt.NDArray[np.bool_]


class _NoConductor:
    """The shard's host never calls the Conductor itself: the driver relays its batches."""

    def __getattr__(self, name: str) -> object:
        raise DispersError(ErrorCode.FAILED_PRECONDITION, "a simulated host's batches go through the driver")


def _buckets(values: npt.NDArray[np.float64], edges: tuple[float, ...]) -> npt.NDArray[np.int64]:
    """Index i with edges[i] <= v < edges[i+1], else -1 (written apart from the protocol's code)."""
    out = np.full(len(values), -1, dtype=np.int64)
    for i, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False)):
        out[(values >= lo) & (values < hi)] = i
    return out


def _target_mask(expr: Expr, masks: list[npt.NDArray[np.bool_]]) -> npt.NDArray[np.bool_]:
    if isinstance(expr, Ref):
        return masks[expr.index]
    if isinstance(expr, Not):
        return ~_target_mask(expr.operand, masks)
    left, right = _target_mask(expr.left, masks), _target_mask(expr.right, masks)
    return (left & right) if isinstance(expr, And) else (left | right)


def _concept_mask(pop: Population, concept: str, as_of: date) -> npt.NDArray[np.bool_]:
    """Who holds a concept, from the generated arrays (ages by the calendar, as the host)."""
    if concept in AGE_CONCEPTS:
        i = AGE_CONCEPTS.index(concept)
        ages = pop.ages_at(as_of)
        return (ages >= AGE_BRACKETS[i]) & (ages < AGE_BRACKETS[i + 1])
    if concept in ("sex:F", "sex:M"):
        return pop.female.copy() if concept == "sex:F" else ~pop.female
    if concept == HAS_HEART_RATE:
        held = np.zeros(pop.n_instances, dtype=bool)
        held[pop.hr_owner[pop.hr_day <= (as_of - _EPOCH).days]] = True
        return held
    return np.zeros(pop.n_instances, dtype=bool)  # a declared cohort: nobody in a generated population


def block_truth(
    pop: Population, query: QuerySpec
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """(value, group, eligible) of each instance of one block, from the reference code."""
    values, has = local_values(pop, query.function, query.params, query.as_of)
    clip = query.out_of_bounds == "clip"
    lo, hi = query.bounds
    # As the DAs do with a value outside the declared bounds: clip it, or drop the item.
    if clip:
        values = np.clip(values, lo, hi)
    else:
        has = has & (values >= lo) & (values <= hi)
    for extra in query.fields[1:]:  # complete cases: an instance lacking any field declines
        more, held = local_values(pop, extra.function, extra.params, query.as_of)
        has = has & held
        if not clip:
            has = has & (more >= extra.bounds[0]) & (more <= extra.bounds[1])
    if query.group_by is None:
        group = np.zeros(pop.n_instances, dtype=np.int64)
    else:
        gb = query.group_by
        group = _buckets(group_field_values(pop, gb.field, query.as_of), gb.edges)
        if gb.then is not None:
            second = _buckets(group_field_values(pop, gb.then.field, query.as_of), gb.then.edges)
            inside = (group >= 0) & (second >= 0)
            group = np.where(inside, group * (len(gb.then.edges) - 1) + second, -1)
    concepts, positional = query.compiled()
    target = _target_mask(
        parse_positional(positional, len(concepts)), [_concept_mask(pop, c, query.as_of) for c in concepts]
    )
    return values, group, target & pop.consent & has & (group >= 0)


def _joined(parts: list[Column]) -> Column:
    """One column from per-block parts, each part freed once copied: the joined arrays are
    allocated untouched (their pages become resident as they are filled), so the peak stays
    near one copy instead of two."""
    total = sum(len(p[0]) for p in parts)
    owner = np.empty(total, dtype=np.int32)
    day = np.empty(total, dtype=np.int32)
    value = np.empty(total, dtype=np.float64)
    at = 0
    parts.reverse()
    while parts:
        o, d, v = parts.pop()
        owner[at : at + len(o)], day[at : at + len(o)], value[at : at + len(o)] = o, d, v
        at += len(o)
    return owner, day, value


def _hand_back_freed_memory() -> Callable[[], None]:
    """Have glibc give freed arrays back to the system; returns a call that trims the heap.

    A shard builds its columns from a hundred blocks, each freed once copied. glibc raises its
    mmap threshold as large blocks are freed, so the later ones come from the heap, where
    freed memory stays resident: a 500,000-instance shard kept 680 MB resident (and peaked at
    820 MB) for 200 MB of arrays. A fixed threshold of 256 KiB (arrays above it are mapped,
    and unmapped when freed) and a trim once built brought it to 400 MB (peak 580 MB).
    Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):
        return lambda: None

    def trim() -> None:
        libc.malloc_trim(0)

    return trim


class Shard:
    """One worker's instances, host and ground truth."""

    def __init__(self, spec: ShardSpec) -> None:
        trim = _hand_back_freed_memory()
        set_crypto(spec.crypto)
        self.spec = spec
        self._seen: Counter[tuple[str, str]] = Counter()
        self._seen_lock = threading.Lock()
        observe.add_observer(self._observe)
        query, faults = spec.query, spec.faults
        kind = measured_kind(query.function)
        read = [measured_kind(f.function) for f in query.all_fields]
        kinds = dict.fromkeys(["heart_rate", *(k for k in read if k)])
        sizes = block_sizes(spec.n_instances)
        ids: list[npt.NDArray[np.bytes_]] = []
        birth, female, consent = [], [], []
        columns: dict[str, list[Column]] = {k: [] for k in kinds}
        truths: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]] = []
        flags: list[tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]] = []
        hi = query.bounds[1]
        for b in spec.blocks:
            pop = generate(
                PopulationSpec(
                    n_instances=sizes[b], seed=block_seed(spec.seed, b), as_of=query.as_of, host=f"b{b:05d}"
                )
            )
            truths.append(block_truth(pop, query))
            rng = np.random.default_rng(np.random.SeedSequence([spec.seed, b, 1]))
            n = pop.n_instances
            offline = rng.random(n) < faults.offline
            declining = rng.random(n) < faults.declining
            oob = rng.random(n) < faults.out_of_bounds if kind else np.zeros(n, dtype=bool)
            flags.append((offline, declining, oob))
            offset = sum(len(i) for i in ids)
            ids.append(np.asarray(pop.instance_ids, dtype=np.bytes_))
            birth.append(pop.birth_days)
            female.append(pop.female)
            consent.append(pop.consent & ~declining)
            for k in kinds:
                series = pop.series(k)
                value = series.value
                if k == kind and oob.any():
                    value = np.where(oob[series.owner], 2 * abs(hi) + 1.0, value)
                # Compact while the other blocks are made: a shard of 500,000 holds 13 M rates.
                owner = (series.owner + offset).astype(np.int32)
                columns[k].append((owner, series.day.astype(np.int32), value))
        self._ids = np.concatenate(ids)  # ASCII bytes, 15 a piece: no Python string per instance
        joined = {k: _joined(columns.pop(k)) for k in kinds}  # each kind's blocks freed once joined
        self._store = ColumnStore(
            self._ids, np.concatenate(birth), np.concatenate(female), np.concatenate(consent), joined
        )
        del joined
        trim()
        self._offline = np.concatenate([f[0] for f in flags])
        self._truth = ShardTruth(
            value=np.concatenate([t[0] for t in truths]),
            group=np.concatenate([t[1] for t in truths]).astype(np.int16),
            eligible=np.concatenate([t[2] for t in truths]),
            offline=self._offline,
            declining=np.concatenate([f[1] for f in flags]),
            out_of_bounds=np.concatenate([f[2] for f in flags]),
        )
        keys = ActorKeys(
            spec.host,
            SealingKeyPair.from_private_bytes(spec.sealing_private),
            SigningKeyPair.from_seed(spec.signing_seed),
            spec.secret,
        )
        self.host = PersonalCloudHost(
            spec.host,
            keys,
            spec.roster,
            spec.settings,
            self._store,
            cast(ConductorAPI, _NoConductor()),
            query.as_of,
        )

    def _observe(self, actor: str, what: str, plaintext: bytes) -> None:
        with self._seen_lock:
            self._seen[(actor, what)] += 1

    @property
    def size(self) -> int:
        """How many instances this shard holds."""
        return len(self._ids)

    def ready(self) -> int:
        """The number of instances, once built (the driver waits on it)."""
        return self.size

    def subscription_batch(self, start: int, stop: int) -> SubscriptionBatch:
        """The host's signed batch subscribing instances [start, stop) of this shard."""
        return self.host.subscription_batch(SubscriptionOp.SUBSCRIBE, self._id_list(start, stop))

    def confirm(self, start: int, stop: int) -> None:
        """The cluster applied the batch: those instances are subscribed and may answer."""
        self._store.set_subscribed(self._id_list(start, stop), True)

    def _id_list(self, start: int, stop: int) -> list[str]:
        return [i.decode() for i in self._ids[start:stop].tolist()]

    def go_offline(self) -> int:
        """Apply the offline fault (after subscription, before the query); returns how many."""
        self._store.set_offline(self._offline)
        return int(self._offline.sum())

    def contribute(self, caller: str, request: ContributionRequest) -> ContributionBatch:
        """The host answers T; a share of answers (the slow fault) come after T's deadline."""
        slow = self.spec.faults.slow
        if slow > 0:
            digest = hashlib.blake2b("\n".join(request.instance_ids).encode(), digest_size=8).digest()
            if int.from_bytes(digest, "big") / 2**64 < slow:
                settings = self.spec.settings
                late = settings.host_deadline_s + settings.host_deadline_per_item_s * len(
                    request.instance_ids
                )
                time.sleep(late + 0.5)
        return self.host.contribute(caller, request)

    def truth(self) -> ShardTruth:
        """What every instance of this shard holds, by the reference code, and its faults."""
        return self._truth

    def where(self) -> tuple[str, int]:
        """This worker's host name and process id (the driver samples the memory of the
        workers on its own machine while the simulation runs)."""
        return socket.gethostname(), os.getpid()

    def usage(self) -> dict[str, object]:
        """This worker's peak memory (bytes) and the plaintexts opened in it, by (actor, kind)."""
        with self._seen_lock:
            seen = [[actor, what, n] for (actor, what), n in self._seen.items()]
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {"peak_rss": own.ru_maxrss * 1024, "cpu_s": own.ru_utime + own.ru_stime, "opened": seen}
