"""Data Aggregator: opens contributions, checks bounds, folds partials in memory, passes them up."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dispers.core.codec import dumps
from dispers.core.codec import field as get_field
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.expiry import EXPIRY, Timer
from dispers.core.ids import Role, check_query_id
from dispers.core.messages import QueryEnvelope
from dispers.core.spec import MAX_LABEL, MAX_QUANTILES, AggregateSpec
from dispers.crypto import ActorKeys, Opener
from dispers.crypto.box import sealed_size
from dispers.protocol.aggregation.partial import Partial
from dispers.protocol.aggregation.release import plan_noise, release_dp
from dispers.protocol.authz import authorize
from dispers.protocol.common import (
    ReplayGuard,
    check_privacy,
    open_padded,
    open_sealed_signed,
    replay_memory_s,
    seal_signed,
    verify_envelope,
)
from dispers.protocol.target_finder import ATTESTATION_BYTES
from dispers.state.budget import BudgetLedger, BudgetStatus, MemoryBudgetLedger, Spend

if TYPE_CHECKING:
    from dispers.protocol.learning.aggregator import RoundAggregator

log = logging.getLogger(__name__)


@dataclass
class _QueryState:
    """Everything a DA holds for one query: in memory only, dropped at finalize or abort."""

    spec: AggregateSpec
    envelope: QueryEnvelope
    partial: Partial
    expected_children: frozenset[str]
    received_children: set[str] = field(default_factory=set)
    # Digests of the ciphertexts taken, against duplicates: a dict holding only bytes and None
    # is untracked by the cyclic collector, where each of its full collections would walk
    # every member of a set (a leaf of a million-target query holds half a million).
    seen: dict[bytes, None] = field(default_factory=dict)
    attested: int | None = None  # root only: TF's signed number of targets
    forwarded: int | None = None  # leaves only: how many items T says it forwarded (stream closed)
    left: tuple[float, float] | None = None  # root, under DP: the querier's budget left once charged
    released: bool = False  # root: the result was sealed to Q (no refund then)
    timer: Timer | None = None  # forgets the query after query_timeout_s
    lock: threading.Lock = field(default_factory=threading.Lock)


def spec_digest(spec: AggregateSpec) -> str:
    """What a child DA signs into its partial so its parent can check they opened one spec."""
    return hashlib.blake2b(dumps(spec.to_obj()), digest_size=16).hexdigest()


class DataAggregator:
    """A DA learns the values it is given, never who gave them; it writes none of them to disk."""

    _rounds_obj: RoundAggregator | None = None  # the training half, made on first use

    def __init__(
        self, keys: ActorKeys, roster: Roster, settings: ClusterSettings, ledger: BudgetLedger | None = None
    ) -> None:
        self.name = keys.name
        # The root's ledger of every querier's privacy budget (no personal data in it).
        self._ledger = ledger if ledger is not None else MemoryBudgetLedger()
        self._keys = keys
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._queries: dict[str, _QueryState] = {}
        self._lock = threading.Lock()
        self._replays = ReplayGuard(replay_memory_s(settings))

    @property
    def active_queries(self) -> int:
        """How many queries this DA holds state for (tests check it returns to 0)."""
        with self._lock:
            return len(self._queries)

    def _expire(self, query_id: str) -> None:
        """The timer's end: forget a query still held after query_timeout_s (invariant 3)."""
        with self._lock:
            state = self._queries.pop(query_id, None)
        if state is not None:
            log.warning("query %s: state expired unfinished", query_id[:8])

    def _state(self, query_id: str) -> _QueryState:
        check_query_id(query_id)
        with self._lock:
            state = self._queries.get(query_id)
        if state is None:
            raise DispersError(ErrorCode.NOT_FOUND, "this aggregator holds no such query")
        return state

    def prepare(self, caller: str, envelope: QueryEnvelope, attestation: bytes = b"") -> None:
        """Verify the query and open this DA's aggregate spec (and, at the root, TF's count)."""
        authorize(self._roster, caller, "data_aggregator.prepare", callee=self.name)
        verify_envelope(envelope, self._roster, self._settings)
        if self.name not in envelope.plan.members:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "this aggregator is not in the query's plan")
        self._replays.claim(envelope.query_id, "query", made_at=envelope.created_at)
        what = "aggregate spec"
        spec = AggregateSpec.from_obj(
            open_padded(self._opener, envelope.spec_for(self.name), self._settings.spec_bytes, what)
        )
        if spec.query_id != envelope.query_id or spec.k != envelope.k:
            raise malformed(f"{what} does not match the query")
        if len(spec.groups) > self._settings.max_groups:
            raise malformed(f"{what}: more than the cluster's max_groups groups")
        if spec.bins and len(spec.bins) - 1 > self._settings.max_bins:
            raise malformed(f"{what}: more than the cluster's max_bins bins")
        # The frames hold the worst case of these limits only: a spec beyond them could fail
        # to fit, or not, depending on the data.
        if spec.n_fields > self._settings.max_fields:
            raise malformed(f"{what}: more than the cluster's max_fields fields")
        if len(set(spec.groups)) != len(spec.groups) or any(len(g) > MAX_LABEL for g in spec.groups):
            raise malformed(f"{what}: group labels must be distinct, of at most {MAX_LABEL} characters")
        if len(spec.quantiles) > MAX_QUANTILES:
            raise malformed(f"{what}: more than {MAX_QUANTILES} quantiles")
        if self._settings.dp and envelope.plan.root == self.name:
            plan_noise(spec, envelope.privacy)  # a spec the noise cannot be calibrated for fails now
        attested: int | None = None
        if envelope.plan.root == self.name:
            tf = self._roster.one(Role.TARGET_FINDER)
            what = "target count"
            body = open_sealed_signed(
                self._opener, attestation, ATTESTATION_BYTES, tf.name, tf.verify_key, what
            )
            attested = get_field(body, "targets", int, what)
            if body.get("query_id") != envelope.query_id or attested < 0:
                raise malformed(f"{what} does not match the query")
        elif attestation:
            raise malformed("only the root aggregator takes the target count")
        left = None
        if envelope.plan.root == self.name and self._settings.dp:
            # Charged before any instance is contacted: a query that would overspend is refused
            # here; once charged, never refunded (see _forget).
            check_privacy(envelope.privacy, spec.stats, self._settings, what="query")
            status = self._ledger.charge(
                envelope.querier,
                envelope.query_id,
                Spend(envelope.privacy.epsilon, envelope.privacy.delta),
                self._budget_total(),
            )
            left = (status.left.epsilon, status.left.delta)
        with self._lock:
            if envelope.query_id in self._queries:
                raise DispersError(ErrorCode.REPLAY, "query was already prepared (replay)")
            self._queries[envelope.query_id] = _QueryState(
                spec=spec,
                envelope=envelope,
                partial=Partial.empty(len(spec.groups), spec.bins, spec.n_fields),
                expected_children=frozenset(envelope.plan.children(self.name)),
                attested=attested,
                left=left,
            )
            qid = envelope.query_id
            self._queries[qid].timer = EXPIRY.schedule(
                self._settings.query_timeout_s, lambda: self._expire(qid)
            )

    def ingest(self, caller: str, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        """Open and fold a batch of items; bad ones are dropped and counted, never fatal.

        Declines are counted apart. The counts reach only Q, inside the sealed result:
        telling T which batch held an out-of-bounds value would tell it something about a value.
        """
        authorize(self._roster, caller, "data_aggregator.ingest", callee=self.name)
        state = self._state(query_id)
        if state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "only leaf aggregators take contributions")
        if state.forwarded is not None:
            raise DispersError(
                ErrorCode.FAILED_PRECONDITION, "the Target closed this query's stream of items"
            )
        if len(ciphertexts) > self._settings.batch_size:
            raise malformed(f"an ingest batch holds at most {self._settings.batch_size} items")
        spec = state.spec
        layout = spec.layout
        item_size = sealed_size(layout.size)
        expected = bytes.fromhex(query_id)
        lo = np.asarray([b[0] for b in spec.all_bounds])
        hi = np.asarray([b[1] for b in spec.all_bounds])
        n_groups = len(spec.groups)
        dropped: dict[str, int] = {}

        def drop(reason: str, n: int = 1) -> None:
            if n:
                dropped[reason] = dropped.get(reason, 0) + n

        with state.lock:
            fresh: list[bytes] = []
            for ciphertext in ciphertexts:
                if not isinstance(ciphertext, bytes) or len(ciphertext) != item_size:
                    drop("malformed")  # not even opened: every honest item has this length
                    continue
                item_digest = hashlib.blake2b(ciphertext, digest_size=16).digest()
                if item_digest in state.seen:
                    drop("duplicate")
                    continue
                state.seen[item_digest] = None
                fresh.append(ciphertext)
            opened: list[bytes] = []
            for plaintext in self._opener.open_many(fresh, "contribution"):
                if plaintext is None:
                    drop("unopenable")
                elif len(plaintext) != layout.size:
                    drop("malformed")
                else:
                    opened.append(plaintext)
            # Every check on the opened records at once, as masks (the hot path of a DA).
            batch = layout.decode_many(opened)
            ours = np.fromiter((q == expected for q in batch.query_ids), dtype=bool, count=len(opened))
            drop("malformed", int((~batch.valid).sum()))
            drop("wrong_query", int((batch.valid & ~ours).sum()))
            mine = batch.valid & ours
            contributions = mine & ~batch.declined
            sound = (batch.groups < n_groups) & np.isfinite(batch.values).all(axis=1)
            drop("malformed", int((contributions & ~sound).sum()))
            inside = ((batch.values >= lo) & (batch.values <= hi)).all(axis=1)
            values = batch.values
            if spec.clip:
                # Clipped, not dropped: counted apart (the release noises that count too).
                state.partial.clipped += int((contributions & sound & ~inside).sum())
                values = np.clip(values, lo, hi)
                good = contributions & sound
            else:
                drop("out_of_bounds", int((contributions & sound & ~inside).sum()))
                good = contributions & sound & inside
            state.partial.add(batch.groups[good], values[good])
            for reason, n in dropped.items():
                state.partial.drop(reason, n)
            state.partial.decline(int((mine & batch.declined).sum()))
        return len(ciphertexts)

    def end_ingest(self, caller: str, query_id: str, forwarded: int) -> None:
        """T's word that it has forwarded all of this query's items here, and how many.

        A leaf finalizes only after it, holding exactly that many items: a Conductor cannot
        finalize a leaf early and have the root release a result resting on part of the targets.
        """
        authorize(self._roster, caller, "data_aggregator.end_ingest", callee=self.name)
        state = self._state(query_id)
        if state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "only leaf aggregators take contributions")
        if not isinstance(forwarded, int) or forwarded < 0:
            raise malformed("the number of items forwarded must be a non-negative integer")
        with state.lock:
            if state.forwarded is not None:
                raise DispersError(ErrorCode.REPLAY, "the stream of items was already closed (replay)")
            state.forwarded = forwarded

    def absorb(self, caller: str, query_id: str, child: str, sealed_partial: bytes) -> None:
        """Merge a child DA's partial (sealed to this DA and signed by the child)."""
        authorize(self._roster, caller, "data_aggregator.absorb", callee=self.name)
        state = self._state(query_id)
        if child not in state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "not a child of this aggregator in the plan")
        what = "partial aggregate"
        child_key = self._roster.require(child, Role.DATA_AGGREGATOR).verify_key
        body = open_sealed_signed(
            self._opener, sealed_partial, self._settings.partial_bytes, child, child_key, what
        )
        if body.get("query_id") != query_id:
            raise malformed(f"{what} belongs to another query")
        if body.get("spec") != spec_digest(state.spec):
            raise malformed(f"{what} was computed under another aggregate spec")
        spec = state.spec
        partial = Partial.from_obj(body.get("partial"), len(spec.groups), spec.bins, spec.n_fields)
        partial.check_possible(spec.all_bounds)
        with state.lock:
            if child in state.received_children:
                raise DispersError(ErrorCode.REPLAY, "partial from this child already merged (replay)")
            state.partial.merge(partial)
            state.received_children.add(child)

    def finalize(self, caller: str, query_id: str) -> bytes:
        """Seal the partial to the parent, or (root) release the result sealed to Q; then forget.

        The root refuses a result resting on more items than TF attested targets
        (invariant 9): someone added items that no target sent.
        """
        authorize(self._roster, caller, "data_aggregator.finalize", callee=self.name)
        state = self._state(query_id)
        missing = state.expected_children - state.received_children
        if missing:
            raise DispersError(
                ErrorCode.FAILED_PRECONDITION,
                f"waiting for partials from {len(missing)} child aggregator(s)",
            )
        if not state.expected_children and state.forwarded != state.partial.items:
            raise DispersError(
                ErrorCode.FAILED_PRECONDITION,
                "the Target has not closed this query's stream of items"
                if state.forwarded is None
                else "this aggregator holds a number of items other than the Target forwarded",
            )
        parent = state.envelope.plan.parent(self.name)
        # Consume the state before anything is computed: an abort racing this finalize finds
        # nothing to forget, so it cannot refund a result that is being released; and whatever
        # happens from here on, the budget stays charged.
        with self._lock:
            if self._queries.get(query_id) is not state:
                raise DispersError(ErrorCode.NOT_FOUND, "this aggregator holds no such query")
            del self._queries[query_id]
            state.released = True
        if state.timer is not None:
            state.timer.cancel()
        with state.lock:
            if parent is None:
                assert state.attested is not None
                if state.partial.items > state.attested:
                    raise DispersError(
                        ErrorCode.FAILED_PRECONDITION,
                        "the aggregate rests on more items than the Target Finder attested targets; "
                        "no result is released",
                    )
                if self._settings.dp:
                    result = release_dp(state.partial, state.spec, state.envelope.privacy, left=state.left)
                else:
                    result = state.partial.release(state.spec)
                result = dataclasses.replace(result, plan=state.envelope.plan.summary())
                return seal_signed(
                        state.envelope.querier_sealing_key, self._keys.signing, self.name,
                        {"query_id": query_id, "result": result.to_obj()},
                        self._settings.result_bytes, "query result",
                    )  # fmt: skip
            # The digest of the spec this DA opened: its parent refuses a partial computed under
            # another spec (each DA gets its own sealed copy; a querier could seal the leaves
            # wide bounds and the root, which calibrates the noise, narrow ones).
            body = {"query_id": query_id, "partial": state.partial.to_obj(), "spec": spec_digest(state.spec)}
            return seal_signed(
                self._roster.require(parent, Role.DATA_AGGREGATOR).sealing_key, self._keys.signing,
                self.name, body, self._settings.partial_bytes, "partial aggregate",
            )  # fmt: skip

    def abort(self, caller: str, query_id: str) -> None:
        """Forget everything about a query (idempotent)."""
        authorize(self._roster, caller, "data_aggregator.abort", callee=self.name)
        self._forget(query_id)

    def budget(self, caller: str, querier: str) -> BudgetStatus:
        """A querier's privacy budget: spent and left (only the querier itself may ask)."""
        authorize(self._roster, caller, "data_aggregator.budget", callee=self.name)
        if caller != querier:
            raise DispersError(ErrorCode.UNAUTHORIZED, "a querier may read only its own budget")
        return self._ledger.status(querier, self._budget_total())

    def _budget_total(self) -> Spend:
        return Spend(self._settings.budget_epsilon, self._settings.budget_delta)

    def _forget(self, query_id: str) -> None:
        with self._lock:
            state = self._queries.pop(query_id, None)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        # No refund: once the root has charged a query, instances may have answered, and
        # whether the query then fails could depend on their data; refunding would make
        # that bit free.

    # --- federated training (dispers.protocol.learning.aggregator) -------------------------------

    @property
    def active_rounds(self) -> int:
        """How many training rounds this DA holds state for (tests check it returns to 0)."""
        return self._rounds_obj.active if self._rounds_obj is not None else 0

    def _round_aggregator(self) -> RoundAggregator:
        from dispers.protocol.learning.aggregator import RoundAggregator

        with self._lock:
            if self._rounds_obj is None:
                self._rounds_obj = RoundAggregator(
                    self._keys, self._roster, self._settings, self._ledger, self._replays
                )
            return self._rounds_obj

    def prepare_round(self, caller: str, envelope: QueryEnvelope, attestation: bytes = b"") -> None:
        """Open this DA's training spec (the root: TF's count, and the round's privacy charge)."""
        authorize(self._roster, caller, "data_aggregator.prepare_round", callee=self.name)
        self._round_aggregator().prepare(envelope, attestation)

    def ingest_round(self, caller: str, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        """Open, check and sum a batch of sealed model updates."""
        authorize(self._roster, caller, "data_aggregator.ingest_round", callee=self.name)
        return self._round_aggregator().ingest(query_id, ciphertexts)

    def end_round_ingest(self, caller: str, query_id: str, forwarded: int) -> None:
        """T's word that it forwarded every update of the round here, and how many."""
        authorize(self._roster, caller, "data_aggregator.end_round_ingest", callee=self.name)
        self._round_aggregator().end_ingest(query_id, forwarded)

    def absorb_round(self, caller: str, query_id: str, child: str, sealed_partial: bytes) -> None:
        """Merge a child DA's sum of updates."""
        authorize(self._roster, caller, "data_aggregator.absorb_round", callee=self.name)
        self._round_aggregator().absorb(query_id, child, sealed_partial)

    def finalize_round(self, caller: str, query_id: str) -> bytes:
        """Seal the sum to the parent, or (root) the round's average update to Q."""
        authorize(self._roster, caller, "data_aggregator.finalize_round", callee=self.name)
        return self._round_aggregator().finalize(query_id)

    def abort_round(self, caller: str, query_id: str) -> None:
        """Forget a round (idempotent; a charged round stays charged)."""
        authorize(self._roster, caller, "data_aggregator.abort_round", callee=self.name)
        self._round_aggregator().abort(query_id)
