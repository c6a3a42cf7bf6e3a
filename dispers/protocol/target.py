"""Target: pseudonym -> address directory; asks targets for contributions, forwards them to DAs."""

from __future__ import annotations

import base64
import itertools
import logging
import random
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from dispers.core.codec import field, hex_bytes, loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role
from dispers.core.messages import (
    NONCE_BYTES,
    BatchHeader,
    CollectReport,
    ContributionBatch,
    ContributionRequest,
    QueryEnvelope,
    SignedItems,
    SubscriptionOp,
    request_signing_bytes,
    signed_items_bytes,
)
from dispers.core.spec import DataRequest
from dispers.core.vocabulary import MAX_ADDRESS_LENGTH
from dispers.core.wire import padded_size
from dispers.crypto import ActorKeys, Opener, keyed_hash
from dispers.crypto.box import sealed_size
from dispers.crypto.permute import shuffled
from dispers.protocol.api import Peers
from dispers.protocol.authz import authorize
from dispers.protocol.common import (
    ReplayGuard,
    Staging,
    check_batch,
    frame_size,
    open_padded,
    open_padded_strings_many,
    open_signed,
    replay_memory_s,
    same_query,
    seal_padded_strings_many,
    take_to_commit,
    unpack,
    verify_envelope,
)
from dispers.protocol.learning.api import as_round_aggregator, as_round_host
from dispers.protocol.learning.messages import (
    RoundRequest,
    TrainingRequest,
    TrainingRound,
    check_cohort,
    check_local_work,
    model_frame_size,
)
from dispers.protocol.target_finder import PSEUDONYM_FRAME
from dispers.state.directory import AddressDirectory

log = logging.getLogger(__name__)
MAX_ADDRESS = MAX_ADDRESS_LENGTH


def split_address(address: str) -> tuple[str, str]:
    """An address is '<host>/<instance id>'."""
    host, sep, instance = address.partition("/")
    if not sep or not host or not instance:
        raise malformed("an address must be '<host>/<instance id>'")
    return host, instance


class Target:
    """T learns target addresses and the data request; never concepts, expression or values."""

    def __init__(
        self,
        keys: ActorKeys,
        roster: Roster,
        settings: ClusterSettings,
        directory: AddressDirectory,
        peers: Peers,
    ) -> None:
        self.name = keys.name
        self._keys = keys
        self._secret = keys.secret
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._directory = directory
        self._peers = peers
        self._tf_key = roster.one(Role.TARGET_FINDER).sealing_key
        self._replays = ReplayGuard(replay_memory_s(settings))
        self._staged: Staging[tuple[SubscriptionOp, list[tuple[bytes, str]]]] = Staging(
            settings.query_timeout_s
        )
        # Threads kept between training rounds (a thread started per call cost a round about a
        # millisecond each): host calls, at most MAX_ROUND_CALLS at once per round, and forwards.
        self._round_calls = ThreadPoolExecutor(max_workers=ROUND_THREADS, thread_name_prefix="t-round")
        self._round_forwards = ThreadPoolExecutor(max_workers=8, thread_name_prefix="t-round-forward")

    def pseudonym(self, address: str) -> bytes:
        """Keyed PRF of an address under T's secret: stable, so re-subscribing changes nothing."""
        return keyed_hash(self._secret, address.encode(), b"dispers-address")

    def pseudonymize(
        self, caller: str, header: BatchHeader, sealed_addresses: Sequence[bytes]
    ) -> SignedItems:
        """Open each address of a host's signed batch; return seal_TF(pseudonym, nonce), signed.

        Every address must belong to the host that signed the batch. The directory changes
        (new entries on subscribe, deletions on unsubscribe) only when the Conductor settles
        the batch with commit=True.
        """
        authorize(self._roster, caller, "target.pseudonymize", callee=self.name)
        if self._directory.batch_committed(header.batch_id):
            raise DispersError(ErrorCode.REPLAY, "this subscription batch was committed before (replay)")
        check_batch(
            header, self._roster, self._settings, sealed_addresses, header.address_digests,
            item_size=frame_size(self._settings.address_bytes),
        )  # fmt: skip
        entries: list[tuple[bytes, str]] = []
        bodies: list[dict[str, str]] = []
        opened = open_padded_strings_many(
            self._opener, sealed_addresses, self._settings.address_bytes, "subscription {i} address"
        )
        for i, obj in enumerate(opened):
            what = f"subscription {i} address"
            address = field(obj, "address", str, what)
            nonce = hex_bytes(obj.get("nonce"), f"{what} nonce", NONCE_BYTES)
            if len(address) > MAX_ADDRESS:
                raise malformed(f"{what} is longer than {MAX_ADDRESS} characters")
            host, _ = split_address(address)
            if host != header.host:
                raise DispersError(ErrorCode.UNAUTHORIZED, f"{what} is not an instance of the signing host")
            pseudonym = self.pseudonym(address)
            entries.append((pseudonym, address))
            bodies.append({"pseudonym": pseudonym.hex(), "nonce": nonce.hex()})
        items = tuple(seal_padded_strings_many(self._tf_key, bodies, PSEUDONYM_FRAME, "pseudonym"))
        self._staged.put(header.batch_id, (header.op, entries))
        signature = self._keys.signing.sign(signed_items_bytes(self.name, header.batch_id, header.op, items))
        return SignedItems(items, signature)

    def settle(self, caller: str, batch_id: str, commit: bool, receipt: bytes = b"") -> None:
        """Commit (or drop) the directory changes a subscription batch staged.

        A commit needs TF's signed receipt for this batch id and op: the Conductor cannot make
        T commit a batch TF refused. A batch id is committed at most once (persisted).
        """
        authorize(self._roster, caller, "target.settle", callee=self.name)
        staged = take_to_commit(self._staged, self._roster, batch_id, commit, receipt)
        if staged is None:
            return
        op, entries = staged
        if op is SubscriptionOp.SUBSCRIBE:
            self._directory.commit_batch(batch_id, entries, [])
        else:
            self._directory.commit_batch(batch_id, [], [p for p, _ in entries])

    def _open_request(self, envelope: QueryEnvelope) -> tuple[DataRequest, bytes, bytes]:
        what = "data request"
        obj = open_padded(self._opener, envelope.sealed_request, self._settings.request_bytes, what)
        try:
            request_bytes = base64.b64decode(field(obj, "request", str, what), validate=True)
        except ValueError:
            raise malformed(f"{what} is not valid base64") from None
        signature = hex_bytes(obj.get("signature"), f"{what} signature", 64)
        envelope.querier_verify_key.verify(request_signing_bytes(request_bytes), signature, what)
        request = DataRequest.from_obj(loads_object(request_bytes, what))
        if request.query_id != envelope.query_id:
            raise malformed(f"{what} belongs to another query")
        if set(request.aggregators) != set(envelope.plan.leaves):
            raise malformed(f"{what} names aggregators other than the plan's leaves")
        if request.layout.n_fields > self._settings.max_fields:
            raise malformed(f"{what} asks more than the cluster's max_fields fields")
        return request, request_bytes, signature

    def collect(self, caller: str, envelope: QueryEnvelope, sealed_pseudonyms: bytes) -> CollectReport:
        """Ask every target for its item and forward the items to the DAs as answers arrive.

        Each host must answer exactly one item per instance asked, of the query's fixed
        length, to the DA assigned to that instance; a host whose answer breaks any of that,
        or that cannot be reached, loses its own items (counted unreachable), never anyone
        else's. A host whose answer does not come within its deadline (``host_deadline_s`` plus
        ``host_deadline_per_item_s`` per instance asked), or that finds the request expired,
        fails the whole query: a result resting on whichever hosts were quick is never released.

        Items reach each DA in windows of ``shuffle_window`` batches, each window in a fresh
        random order, so an item's position tells a DA at most which window it came in.
        """
        authorize(self._roster, caller, "target.collect", callee=self.name)
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.claim(envelope.query_id, "query", made_at=envelope.created_at)
        request, request_bytes, signature = self._open_request(envelope)
        item_size = sealed_size(request.layout.size)
        what = "target pseudonyms"
        tf = self._roster.one(Role.TARGET_FINDER)
        obj = open_signed(self._opener.open(sealed_pseudonyms, what), tf.name, tf.verify_key, what)
        same_query(obj, envelope, what)
        pseudonyms = unpack(obj.get("pseudonyms"), 32, what)
        found = self._directory.lookup(list(dict.fromkeys(pseudonyms)))
        # A pseudonym TF knows but the directory does not (a batch whose settle never came)
        # is counted unreachable rather than failing everyone else's query.
        addresses = shuffled([a for a in found if a is not None])
        unknown = len(pseudonyms) - len(addresses)

        leaves = list(envelope.plan.leaves)
        by_host: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i, address in enumerate(addresses):
            host, instance = split_address(address)
            by_host[host].append((instance, leaves[i % len(leaves)]))
        size = self._settings.batch_size
        jobs = host_batches(by_host, size)
        forwarder = _Forwarder(
            self._peers, envelope.query_id, leaves, size, self._settings.shuffle_window * size
        )
        started: dict[int, float] = {}
        refusals: list[ErrorCode] = []  # the codes of hosts that refused (never their messages)

        def ask(index: int) -> list[tuple[str, bytes]] | None:
            host, items = jobs[index]
            started[index] = time.monotonic()
            req = ContributionRequest(
                query_id=envelope.query_id,
                querier=envelope.querier,
                request=request_bytes,
                request_signature=signature,
                instance_ids=tuple(i for i, _ in items),
                aggregators=tuple(a for _, a in items),
            )
            try:
                batch = self._peers.personal_cloud(host).contribute(req)
            except DispersError as exc:
                # Past the deadline, any outcome fails the query (a slow host that then errs
                # must not leave a result on the quick ones); an expired request too, with T's
                # own words only (a host's message never reaches the querier).
                if exc.code is ErrorCode.EXPIRED or time.monotonic() - started[index] > self._deadline(
                    len(items)
                ):
                    raise _expired() from None
                log.warning("query %s: host %s failed: %s", envelope.query_id[:8], host, exc.code.value)
                refusals.append(exc.code)
                return None
            if time.monotonic() - started[index] > self._deadline(len(items)):
                raise _expired()
            problem = _check_answer(batch, req.aggregators, item_size)
            if problem:
                log.warning("query %s: host %s answered %s; its items are dropped",
                            envelope.query_id[:8], host, problem)  # fmt: skip
                return None
            return list(zip(batch.aggregators, batch.ciphertexts, strict=True))

        unreachable = unknown
        pool = ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs))), thread_name_prefix="t-collect")
        try:
            pending = {pool.submit(ask, i): i for i in range(len(jobs))}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    pairs = future.result()  # EXPIRED fails the query here
                    if pairs is None:
                        unreachable += len(jobs[index][1])
                    else:
                        forwarder.add(pairs)
                now = time.monotonic()
                if any(
                    now - started[i] > self._deadline(len(jobs[i][1]))
                    for i in pending.values()
                    if i in started
                ):
                    raise _expired()
            if jobs and len(refusals) == len(jobs):
                # No host answered at all (so nothing was forwarded): the query's own request is
                # at fault (or every host is down), and an empty release would only hide it.
                # Only the code travels: a host's message stays in its own log.
                code = Counter(refusals).most_common(1)[0][0]
                how = "was unreachable" if code is ErrorCode.UNAVAILABLE else "refused the data request"
                raise DispersError(code, f"every host {how} ({code.value}); the hosts' logs say why")
            per_aggregator = forwarder.close()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            forwarder.abandon()
            raise
        pool.shutdown()
        return CollectReport(
            targets=len(pseudonyms),
            forwarded=sum(per_aggregator.values()),
            unreachable=unreachable,
            per_aggregator=tuple((leaf, per_aggregator[leaf]) for leaf in leaves),
        )

    def _deadline(self, items: int) -> float:
        """How long a host may take to answer a request for `items` instances."""
        return self._settings.host_deadline_s + self._settings.host_deadline_per_item_s * items

    def collect_round(
        self, caller: str, training_round: TrainingRound, sealed_pseudonyms: bytes
    ) -> CollectReport:
        """Draw a round's cohort among the targets, have their hosts train, forward the updates.

        The cohort is Poisson-sampled by T's own secure generator: each target independently at
        rate cohort / targets, the rate the root DA charges for (the accountant's sampling), so
        its size varies around `cohort`. Each host gets the global model Q sealed to it and answers
        exactly one fixed-length item per instance asked; a host that fails or breaks that
        loses its own items (counted unreachable: the round's dropouts), never anyone else's.
        """
        authorize(self._roster, caller, "target.collect_round", callee=self.name)
        envelope = training_round.envelope
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.claim(envelope.query_id, "query", made_at=envelope.created_at)
        request, request_bytes, signature = _training_request(self._opener, envelope, self._settings)
        model_size = sealed_size(padded_size(model_frame_size(request.n_params)))
        if any(len(ct) != model_size for _, ct in training_round.sealed_models):
            raise malformed("a sealed global model does not have the round's fixed length")
        item_size = sealed_size(request.layout.size)
        what = "target pseudonyms"
        tf = self._roster.one(Role.TARGET_FINDER)
        obj = open_signed(self._opener.open(sealed_pseudonyms, what), tf.name, tf.verify_key, what)
        same_query(obj, envelope, what)
        pseudonyms = unpack(obj.get("pseudonyms"), 32, what)
        drawn = draw_cohort(
            list(dict.fromkeys(pseudonyms)), request.cohort, secrets.SystemRandom(), len(pseudonyms)
        )
        found = self._directory.lookup(drawn)
        cohort = shuffled([a for a in found if a is not None])
        unreachable = len(drawn) - len(cohort)  # drawn, but no address: the round's dropouts
        leaves = list(envelope.plan.leaves)
        by_host: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i, address in enumerate(cohort):
            host, instance = split_address(address)
            by_host[host].append((instance, leaves[i % len(leaves)]))
        size = self._settings.batch_size
        jobs = host_batches(by_host, size)
        per_da: dict[str, list[bytes]] = {leaf: [] for leaf in leaves}

        def ask(job: tuple[str, list[tuple[str, str]]]) -> list[tuple[str, bytes]] | None:
            host, items = job
            try:
                req = RoundRequest(
                    query_id=envelope.query_id,
                    querier=envelope.querier,
                    request=request_bytes,
                    request_signature=signature,
                    sealed_model=training_round.model_for(host),
                    instance_ids=tuple(i for i, _ in items),
                    aggregators=tuple(a for _, a in items),
                )
                batch = as_round_host(self._peers.personal_cloud(host)).train(req)
            except DispersError as exc:
                log.warning("round %s: host %s failed: %s", envelope.query_id[:8], host, exc.code.value)
                return None
            except Exception:  # noqa: BLE001  (any other failure: lost like an unreachable host's)
                log.warning("round %s: host %s failed: INTERNAL", envelope.query_id[:8], host)
                return None
            problem = _check_answer(batch, req.aggregators, item_size)
            if problem:
                log.warning("round %s: host %s answered %s; its items are dropped",
                            envelope.query_id[:8], host, problem)  # fmt: skip
                return None
            return list(zip(batch.aggregators, batch.ciphertexts, strict=True))

        # Every host answers at the round's fixed time (it holds its answer until then), so every
        # host is asked at once (in waves beyond MAX_ROUND_CALLS); T waits that long plus a host's
        # usual deadline per wave, then counts a host still silent unreachable.
        workers = min(MAX_ROUND_CALLS, max(1, len(jobs)))
        waves = -(-len(jobs) // workers)
        deadline = time.monotonic() + waves * (request.round_time_s + self._deadline(size))
        slots = threading.BoundedSemaphore(workers)
        futures: list[Future[list[tuple[str, bytes]] | None]] = []
        for job in jobs:  # a job is sent when one of this round's slots frees (the next wave)
            if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break  # past the deadline: the jobs not sent are late like those not answered
            future = self._round_calls.submit(ask, job)
            future.add_done_callback(lambda _: slots.release())
            futures.append(future)
        wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        answers = [f.result() if f.done() else None for f in futures]
        answers += [None] * (len(jobs) - len(futures))
        late = sum(1 for f in futures if not f.done()) + len(jobs) - len(futures)
        if late:
            log.warning("round %s: %d host call(s) past the round's deadline", envelope.query_id[:8], late)
        for job, pairs in zip(jobs, answers, strict=True):
            if pairs is None:
                unreachable += len(job[1])
                continue
            for aggregator, ciphertext in pairs:
                per_da[aggregator].append(ciphertext)

        def forward(leaf: str) -> None:
            items = shuffled(per_da[leaf])
            da = as_round_aggregator(self._peers.data_aggregator(leaf))
            for j in range(0, len(items), size):
                da.ingest_round(envelope.query_id, items[j : j + size])
            da.end_round_ingest(envelope.query_id, len(items))

        forwards = [self._round_forwards.submit(forward, leaf) for leaf in leaves]
        wait(forwards)
        for sent in forwards:
            sent.result()
        return CollectReport(
            targets=len(pseudonyms),
            forwarded=sum(len(v) for v in per_da.values()),
            unreachable=unreachable,
            per_aggregator=tuple((leaf, len(per_da[leaf])) for leaf in leaves),
        )


def _expired() -> DispersError:
    return DispersError(
        ErrorCode.EXPIRED,
        "a host's answer did not arrive before its deadline (or found the request expired): "
        "the query fails rather than release a result on part of its targets",
    )


T_ = TypeVar("T_")
MAX_ROUND_CALLS = 256
ROUND_THREADS = 16 * MAX_ROUND_CALLS  # across concurrent rounds; started only as needed
"""Host calls T has in flight at once in a training round (each waits for the round time)."""

MIN_WINDOW = 1000
"""Fewest items in one shuffled window (unless a DA's whole stream is smaller: then all of it)."""


class _Forwarder:
    """Forwards items to each leaf DA as they arrive: buffered per DA, a window at a time,
    each window shuffled, in batches; one worker per DA keeps its batches in order."""

    def __init__(self, peers: Peers, query_id: str, leaves: Sequence[str], batch: int, window: int) -> None:
        self._peers = peers
        self._query_id = query_id
        self._batch = batch
        self._window = max(window, batch, MIN_WINDOW)
        self._buffers: dict[str, list[bytes]] = {leaf: [] for leaf in leaves}
        self._counts: dict[str, int] = {leaf: 0 for leaf in leaves}
        self._workers = {
            leaf: ThreadPoolExecutor(max_workers=1, thread_name_prefix="t-forward") for leaf in leaves
        }
        self._sent: list[Future[int]] = []

    def add(self, pairs: Sequence[tuple[str, bytes]]) -> None:
        """Take one host's answer (each item with its DA); send a window once a DA's buffer
        holds two, keeping at least one back: the last window, sent at close with whatever came
        after, never holds fewer than a window's items (a lone late host's item would
        otherwise reach its DA alone)."""
        for aggregator, ciphertext in pairs:
            self._buffers[aggregator].append(ciphertext)
        for leaf, buffer in self._buffers.items():
            while len(buffer) >= 2 * self._window:
                # Drawn at random from the buffer, not its oldest items: a window mixes hosts.
                buffer[:] = shuffled(buffer)
                self._send(leaf, buffer[: self._window])
                del buffer[: self._window]

    def _send(self, leaf: str, items: list[bytes]) -> None:
        items = shuffled(items)
        self._counts[leaf] += len(items)
        da = self._peers.data_aggregator(leaf)
        for j in range(0, len(items), self._batch):
            chunk = items[j : j + self._batch]
            self._sent.append(self._workers[leaf].submit(da.ingest, self._query_id, chunk))
        for future in [f for f in self._sent if f.done()]:
            future.result()  # an ingest that failed fails the query now
            self._sent.remove(future)

    def close(self) -> dict[str, int]:
        """Send what is left, wait for every batch, and close each DA's stream with its count."""
        for leaf, buffer in self._buffers.items():
            if buffer:
                self._send(leaf, buffer)
            buffer.clear()
        for future in self._sent:
            future.result()
        self._sent.clear()
        for leaf, worker in self._workers.items():
            worker.shutdown()
            self._peers.data_aggregator(leaf).end_ingest(self._query_id, self._counts[leaf])
        return dict(self._counts)

    def abandon(self) -> None:
        """Stop sending (the query failed: the Conductor aborts the DAs)."""
        for worker in self._workers.values():
            worker.shutdown(wait=False, cancel_futures=True)


def host_batches(by_host: dict[str, list[T_]], size: int) -> list[tuple[str, list[T_]]]:
    """Each host's items in batches of `size`, the hosts taken in turn (a batch of each, then
    the next of each): the calls in flight reach every host at once, instead of one host's
    batches all queueing while the others wait for their turn."""
    per_host = [
        [(host, items[j : j + size]) for j in range(0, len(items), size)] for host, items in by_host.items()
    ]
    return [batch for turn in itertools.zip_longest(*per_host) for batch in turn if batch is not None]


def draw_cohort(
    targets: Sequence[bytes], cohort: int, rng: random.Random, population: int | None = None
) -> list[bytes]:
    """Poisson sampling: each of `targets` independently with probability cohort / population
    (TF's attested count of targets, by default len(targets)), capped at 1."""
    rate = min(1.0, cohort / max(1, len(targets) if population is None else population))
    if rate >= 1.0:
        return list(targets)
    return [t for t in targets if rng.random() < rate]


def _training_request(
    opener: Opener, envelope: QueryEnvelope, settings: ClusterSettings
) -> tuple[TrainingRequest, bytes, bytes]:
    """Open a round's training request (sealed to T) and check Q signed it for this round."""
    what = "training request"
    obj = open_padded(opener, envelope.sealed_request, settings.request_bytes, what)
    try:
        request_bytes = base64.b64decode(field(obj, "request", str, what), validate=True)
    except ValueError:
        raise malformed(f"{what} is not valid base64") from None
    signature = hex_bytes(obj.get("signature"), f"{what} signature", 64)
    envelope.querier_verify_key.verify(request_signing_bytes(request_bytes), signature, what)
    request = TrainingRequest.from_obj(loads_object(request_bytes, what))
    if request.query_id != envelope.query_id:
        raise malformed(f"{what} belongs to another round")
    if set(request.aggregators) != set(envelope.plan.leaves):
        raise malformed(f"{what} names aggregators other than the plan's leaves")
    if request.cohort != envelope.cohort:  # the root DA charges for the envelope's cohort
        raise malformed(f"{what}: its cohort is not the one the querier signed into the round")
    check_cohort(request.cohort, envelope.k, what)
    check_local_work(request.epochs, request.batch_size, request.round_time_s, settings, request.max_examples)
    return request, request_bytes, signature


def _check_answer(batch: ContributionBatch, asked: Sequence[str], item_size: int) -> str | None:
    """Why a host's answer is refused, or None: exactly one item per instance asked, each to
    the DA assigned to it (the same number per DA), each of the query's fixed sealed length."""
    if len(batch.ciphertexts) != len(asked) or len(batch.aggregators) != len(asked):
        return "a number of items other than the instances asked"
    if Counter(batch.aggregators) != Counter(asked):
        return "items for aggregators it was not told to use"
    if any(len(ct) != item_size for ct in batch.ciphertexts):
        return "items of the wrong length"
    return None
