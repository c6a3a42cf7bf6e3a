"""Conductor: orchestrates subscriptions and queries, relays ciphertext, keeps timings and counts."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role
from dispers.core.messages import QueryEnvelope, SubscriptionBatch
from dispers.crypto.permute import secure_permutation
from dispers.protocol.api import Peers
from dispers.protocol.authz import authorize
from dispers.protocol.common import frame_size, verify_envelope
from dispers.protocol.learning.api import as_round_aggregator, as_round_target
from dispers.protocol.learning.messages import TrainingRound
from dispers.state.queries import QueryRecord, QueryStore

log = logging.getLogger(__name__)
FINAL_STATES = ("done", "refused", "failed")
Executor = Callable[[Callable[[], None]], None]


_ITEM = re.compile(r"^subscription (\d+) ")


def _in_caller_order(exc: DispersError, order: list[int]) -> DispersError:
    """Errors name items by their shuffled position; give the caller its own position back."""
    m = _ITEM.match(exc.message)
    if not m or int(m.group(1)) >= len(order):
        return exc
    return DispersError(exc.code, f"subscription {order[int(m.group(1))]} " + exc.message[m.end() :])


def run_inline(job: Callable[[], None]) -> None:
    """Executor that runs a query to completion inside submit (the in-process transport's)."""
    job()


def run_in_thread(job: Callable[[], None]) -> None:
    """Executor that runs each query on its own daemon thread (the services')."""
    threading.Thread(target=job, name="dispers-query", daemon=True).start()


class Conductor:
    """C sees only ciphertext, sizes and timings: it never holds a key that opens a payload."""

    def __init__(
        self,
        name: str,
        roster: Roster,
        settings: ClusterSettings,
        store: QueryStore,
        peers: Peers,
        executor: Executor = run_inline,
    ) -> None:
        self.name = name
        self._roster = roster
        self._settings = settings
        self._store = store
        self._peers = peers
        self._executor = executor
        self._done = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="conductor-relay")
        self._long_polls = threading.BoundedSemaphore(max(1, settings.max_long_polls))
        if settings.max_long_polls == 0:
            self._long_polls.acquire()  # nobody waits

    def get_roster(self, caller: str) -> Roster:
        """The cluster's public roster."""
        authorize(self._roster, caller, "conductor.get_roster", callee=self.name)
        return self._roster

    def get_vocabulary(self, caller: str) -> tuple[str, ...]:
        """The cluster's public concept vocabulary."""
        authorize(self._roster, caller, "conductor.get_vocabulary", callee=self.name)
        return self._settings.vocabulary

    def subscribe(self, caller: str, batch: SubscriptionBatch) -> int:
        """Relay one host's signed batch of subscriptions through CI, T and TF, shuffled.

        Only a host subscribes, and only its own instances: the batch must be signed by the
        caller. CI and T stage what they would write under the batch id (derived from what
        the host signed); once TF has applied the batch they are told to commit, and if
        anything was refused, to drop it: all or nothing.
        """
        authorize(self._roster, caller, "conductor.subscribe", callee=self.name)
        header = batch.header
        if header.host != caller:
            raise DispersError(ErrorCode.UNAUTHORIZED, "a host may subscribe only its own instances")
        if not batch.items:
            return 0
        if len(batch.items) > self._settings.batch_size:
            raise malformed(f"a subscription batch holds at most {self._settings.batch_size} items")
        batch.check_digests()
        sizes = (frame_size(self._settings.concepts_bytes), frame_size(self._settings.address_bytes))
        if any((len(i.sealed_concepts), len(i.sealed_address)) != sizes for i in batch.items):
            raise malformed("a subscription item does not have the cluster's fixed length")
        self._roster.get(caller).verify_key.verify(
            header.signing_bytes(), header.signature, "subscription batch"
        )
        # So CI, T and TF cannot pair items by arrival position.
        order = secure_permutation(len(batch.items)).tolist()
        shuffled = [batch.items[i] for i in order]
        batch_id = header.batch_id
        ci, t = self._peers.concept_indexor(), self._peers.target()
        try:
            # CI and T work on their halves at once; both have answered (or failed) before
            # anything is settled, so a drop never races a staging.
            asked_t = self._pool.submit(t.pseudonymize, header, [s.sealed_address for s in shuffled])
            try:
                tokens = ci.tokenize_subscriptions(batch_id, header.op, [s.sealed_concepts for s in shuffled])
            finally:
                wait([asked_t])
            pseudonyms = asked_t.result()
            receipt = self._peers.target_finder().apply_subscriptions(header.op, batch_id, tokens, pseudonyms)
        except DispersError as exc:
            for actor in (ci, t):
                try:
                    actor.settle(batch_id, False)
                except DispersError:  # staged entries also expire on their own
                    log.warning("could not drop a refused subscription batch")
            raise _in_caller_order(exc, order) from None
        # Each side settles whatever the other does: T's directory must follow TF even when CI
        # (whose catalogue nothing depends on) fails. The host hears of any failure and, with
        # its instances not marked subscribed, subscribes them again in a new batch.
        failed: DispersError | None = None
        for actor in (t, ci):
            try:
                actor.settle(batch_id, True, receipt.signature)
            except DispersError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        log.info("%s: a batch of %d subscriptions applied", header.op.value, receipt.applied)
        return receipt.applied

    def submit(self, caller: str, envelope: QueryEnvelope) -> str:
        """Check who asks and record the query; it then runs on the executor."""
        authorize(self._roster, caller, "conductor.submit", callee=self.name)
        if envelope.querier != caller:
            raise DispersError(ErrorCode.UNAUTHORIZED, "a querier may submit only its own queries")
        verify_envelope(envelope, self._roster, self._settings)
        self._store.create(
            QueryRecord(
                query_id=envelope.query_id,
                querier=envelope.querier,
                created_at=time.time(),
                state="pending",
                k=envelope.k,
            )
        )
        log.info("query %s from %s accepted", envelope.query_id[:8], envelope.querier)
        self._executor(lambda: self._run(envelope))
        return envelope.query_id

    def status(self, caller: str, query_id: str, wait_s: float = 0.0) -> QueryRecord:
        """The query's record as its querier may see it, waiting up to wait_s for it to end.

        Only the querier who submitted a query reads it, and without the Conductor's counts and
        phase timings: the number of targets beside the released counts would give a suppressed
        group away, and the collect phase's time grows with the number of targets.
        At most `max_long_polls` calls wait at once, each at most `max_wait_s`; the others
        answer at once, so waiting callers cannot starve the server's workers.
        """
        authorize(self._roster, caller, "conductor.status", callee=self.name)
        record = self._store.get(query_id)
        if record.querier != caller:
            raise DispersError(ErrorCode.NOT_FOUND, "no query with this id")  # as for an unknown id
        wait = max(0.0, min(wait_s, self._settings.max_wait_s, self._settings.query_timeout_s))
        if wait > 0 and record.state not in FINAL_STATES and self._long_polls.acquire(blocking=False):
            try:
                record = self._wait(query_id, wait)
            finally:
                self._long_polls.release()
        return dataclasses.replace(record, counts={}, phases={})

    def record(self, query_id: str) -> QueryRecord:
        """The full record, counts included (for the Conductor's operator and tests)."""
        return self._store.get(query_id)

    def _wait(self, query_id: str, wait_s: float) -> QueryRecord:
        deadline = time.monotonic() + wait_s
        with self._done:
            while True:
                record = self._store.get(query_id)
                remaining = deadline - time.monotonic()
                if record.state in FINAL_STATES or remaining <= 0:
                    return record
                self._done.wait(remaining)

    @contextmanager
    def _phase(self, query_id: str, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._store.update(query_id, phases={name: time.perf_counter() - start})

    def _run(self, envelope: QueryEnvelope) -> None:
        qid = envelope.query_id
        plan = envelope.plan
        prepared: list[str] = []
        self._store.update(qid, state="running")
        try:
            with self._phase(qid, "tokens"):
                sealed_tokens = self._peers.concept_indexor().tokenize_query(envelope)
            with self._phase(qid, "targets"):
                found = self._peers.target_finder().find_targets(envelope, sealed_tokens)
            self._store.update(qid, counts={"targets": found.count})
            with self._phase(qid, "prepare"):
                for da in plan.members:
                    attestation = found.sealed_attestation if da == plan.root else b""
                    prepared.append(da)
                    self._peers.data_aggregator(da).prepare(envelope, attestation)
            with self._phase(qid, "collect"):
                report = self._peers.target().collect(envelope, found.sealed_pseudonyms)
            self._store.update(
                qid,
                counts={
                    "forwarded": report.forwarded,
                    "unreachable": report.unreachable,
                    **{f"to:{da}": n for da, n in report.per_aggregator},
                },
            )
            with self._phase(qid, "aggregate"):
                for layer in plan.layers()[:-1]:
                    for da in layer:
                        sealed = self._peers.data_aggregator(da).finalize(qid)
                        parent = plan.parent(da)
                        assert parent is not None
                        self._peers.data_aggregator(parent).absorb(qid, da, sealed)
                sealed_result = self._peers.data_aggregator(plan.root).finalize(qid)
            self._store.update(qid, state="done", sealed_result=sealed_result)
            log.info("query %s done", qid[:8])
        except DispersError as exc:
            state = "refused" if exc.code is ErrorCode.TOO_FEW_TARGETS else "failed"
            self._store.update(qid, state=state, error_code=exc.code.value, error_message=exc.message)
            log.info("query %s %s: %s", qid[:8], state, exc.code.value)
            self._abort(qid, prepared)
        except Exception:  # a bug or a transport failure: record it, never leave a query running
            log.exception("query %s failed unexpectedly", qid[:8])
            self._store.update(
                qid,
                state="failed",
                error_code=ErrorCode.INTERNAL.value,
                error_message="internal error",
            )
            self._abort(qid, prepared)
        finally:
            with self._done:
                self._done.notify_all()

    def submit_round(self, caller: str, training_round: TrainingRound) -> str:
        """Check who asks and record a training round; it then runs on the executor like a query.

        Its result (the round's average update, sealed to Q by the root DA) is read with `status`.
        """
        authorize(self._roster, caller, "conductor.submit_round", callee=self.name)
        envelope = training_round.envelope
        if envelope.querier != caller:
            raise DispersError(ErrorCode.UNAUTHORIZED, "a querier may submit only its own rounds")
        verify_envelope(envelope, self._roster, self._settings)
        hosts = sorted(h.name for h in self._roster.by_role(Role.PERSONAL_CLOUD))
        if sorted(h for h, _ in training_round.sealed_models) != hosts:
            raise malformed("a round must carry exactly one sealed model per host of the roster")
        if len({len(ct) for _, ct in training_round.sealed_models}) > 1:
            raise malformed("the sealed models of a round must have one length")
        self._store.create(
            QueryRecord(
                query_id=envelope.query_id,
                querier=envelope.querier,
                created_at=time.time(),
                state="pending",
                k=envelope.k,
            )
        )
        log.info("round %s from %s accepted", envelope.query_id[:8], envelope.querier)
        self._executor(lambda: self._run_round(training_round))
        return envelope.query_id

    def _run_round(self, training_round: TrainingRound) -> None:
        envelope = training_round.envelope
        qid = envelope.query_id
        plan = envelope.plan
        prepared: list[str] = []
        self._store.update(qid, state="running")
        try:
            with self._phase(qid, "tokens"):
                sealed_tokens = self._peers.concept_indexor().tokenize_query(envelope)
            with self._phase(qid, "targets"):
                found = self._peers.target_finder().find_targets(envelope, sealed_tokens)
            self._store.update(qid, counts={"targets": found.count})
            with self._phase(qid, "prepare"):
                for da in plan.members:
                    attestation = found.sealed_attestation if da == plan.root else b""
                    prepared.append(da)
                    as_round_aggregator(self._peers.data_aggregator(da)).prepare_round(envelope, attestation)
            with self._phase(qid, "train"):
                report = as_round_target(self._peers.target()).collect_round(
                    training_round, found.sealed_pseudonyms
                )
            self._store.update(
                qid,
                counts={
                    "forwarded": report.forwarded,
                    "unreachable": report.unreachable,
                    **{f"to:{da}": n for da, n in report.per_aggregator},
                },
            )
            with self._phase(qid, "aggregate"):
                for layer in plan.layers()[:-1]:
                    for da in layer:
                        sealed = as_round_aggregator(self._peers.data_aggregator(da)).finalize_round(qid)
                        parent = plan.parent(da)
                        assert parent is not None
                        as_round_aggregator(self._peers.data_aggregator(parent)).absorb_round(qid, da, sealed)
                sealed_result = as_round_aggregator(self._peers.data_aggregator(plan.root)).finalize_round(
                    qid
                )
            self._store.update(qid, state="done", sealed_result=sealed_result)
            log.info("round %s done", qid[:8])
        except DispersError as exc:
            state = "refused" if exc.code is ErrorCode.TOO_FEW_TARGETS else "failed"
            self._store.update(qid, state=state, error_code=exc.code.value, error_message=exc.message)
            log.info("round %s %s: %s", qid[:8], state, exc.code.value)
            self._abort_round(qid, prepared)
        except Exception:  # a bug or a transport failure: record it, never leave a round running
            log.exception("round %s failed unexpectedly", qid[:8])
            self._store.update(
                qid, state="failed", error_code=ErrorCode.INTERNAL.value, error_message="internal error"
            )
            self._abort_round(qid, prepared)
        finally:
            with self._done:
                self._done.notify_all()

    def _abort_round(self, query_id: str, prepared: list[str]) -> None:
        for da in prepared:
            try:
                as_round_aggregator(self._peers.data_aggregator(da)).abort_round(query_id)
            except Exception:  # best effort: DAs also expire unfinished rounds
                log.warning("round %s: could not abort at %s", query_id[:8], da)

    def _abort(self, query_id: str, prepared: list[str]) -> None:
        for da in prepared:
            try:
                self._peers.data_aggregator(da).abort(query_id)
            except Exception:  # best effort: DAs also expire unfinished queries
                log.warning("query %s: could not abort at %s", query_id[:8], da)
