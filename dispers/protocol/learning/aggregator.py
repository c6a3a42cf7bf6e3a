"""A DA's training ops: open updates, check them, sum them as partials in memory, release the average.

The DataAggregator delegates its `*_round` operations here (authorization is checked there first).
Per round the state is in memory only and forgotten at finalize or abort (invariant 3). The root
also keeps, per training run, how many rounds it charged (no personal data): the accountant's
increment for the next round depends on it, and a querier cannot pick a cheaper round number.
A charged round is never refunded, released or not, as for queries (data_aggregator.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dispers.core.codec import field as get_field
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.expiry import EXPIRY, Timer
from dispers.core.ids import Role, check_query_id
from dispers.core.messages import QueryEnvelope
from dispers.crypto import ActorKeys, Opener
from dispers.crypto.box import sealed_size
from dispers.learn.accounting import UserLevelDP, epsilon_after, round_charge
from dispers.learn.aggregate import NORM_SLACK, UpdateSum, average
from dispers.protocol.common import (
    ReplayGuard,
    open_padded,
    open_sealed_signed,
    seal_signed,
    verify_envelope,
)
from dispers.protocol.learning.messages import DECLINE_CUT, TrainingSpec, check_cohort, round_frame_bytes
from dispers.protocol.target_finder import ATTESTATION_BYTES
from dispers.state.budget import BudgetLedger, Spend

log = logging.getLogger(__name__)


@dataclass
class _Round:
    spec: TrainingSpec
    envelope: QueryEnvelope
    partial: UpdateSum
    expected_children: frozenset[str]
    received_children: set[str] = field(default_factory=set)
    seen: set[bytes] = field(default_factory=set)
    attested: int | None = None
    forwarded: int | None = None
    charged: tuple[float, float] | None = None  # root: (epsilon, delta) charged for this round
    left: float | None = None
    dp: UserLevelDP | None = None
    run: _Run | None = None  # root: the run this round was charged to (never looked up again)
    released: bool = False
    timer: Timer | None = None  # forgets the round after query_timeout_s
    lock: threading.Lock = field(default_factory=threading.Lock)
    spec_digest: str = ""  # what partials of this round carry (set at prepare)

    def __post_init__(self) -> None:
        self.spec_digest = _digest(self.spec)


@dataclass
class _Run:
    querier: str
    params: UserLevelDP | None
    rounds: int = 0  # rounds released (charged for good)
    in_flight: str | None = None  # the query id of the round being aggregated


def _count_round(run: _Run, query_id: str) -> None:
    """Count round `query_id` on the run it was charged to, once, and only while it is the run's
    round in flight (the caller holds the aggregator's lock)."""
    if run.in_flight == query_id:
        run.in_flight = None
        run.rounds += 1


class RoundAggregator:
    """The training half of a Data Aggregator."""

    def __init__(
        self,
        keys: ActorKeys,
        roster: Roster,
        settings: ClusterSettings,
        ledger: BudgetLedger,
        replays: ReplayGuard,
    ) -> None:
        self.name = keys.name
        self._keys = keys
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._ledger = ledger
        self._replays = replays
        self._rounds: dict[str, _Round] = {}
        self._runs: dict[tuple[str, str], _Run] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        """Rounds held in memory."""
        with self._lock:
            return len(self._rounds)

    def _state(self, query_id: str) -> _Round:
        check_query_id(query_id)
        with self._lock:
            state = self._rounds.get(query_id)
        if state is None:
            raise DispersError(ErrorCode.NOT_FOUND, "this aggregator holds no such round")
        return state

    def prepare(self, envelope: QueryEnvelope, attestation: bytes) -> None:
        """Open this DA's training spec; at the root, TF's count and the round's privacy charge."""
        verify_envelope(envelope, self._roster, self._settings)
        plan = envelope.plan
        if self.name not in plan.members:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "this aggregator is not in the round's plan")
        self._replays.claim(envelope.query_id, "query", made_at=envelope.created_at)
        what = "training spec"
        spec = TrainingSpec.from_obj(
            open_padded(self._opener, envelope.spec_for(self.name), self._settings.spec_bytes, what)
        )
        if spec.query_id != envelope.query_id or spec.k != envelope.k:
            raise malformed(f"{what} does not match the round")
        if spec.cohort != envelope.cohort:  # T checks its request against the same signed number
            raise malformed(f"{what}: its cohort is not the one the querier signed into the round")
        check_cohort(spec.cohort, spec.k, what)
        state = _Round(spec, envelope, UpdateSum.empty(spec.sum_size), frozenset(plan.children(self.name)))
        if plan.root == self.name:
            tf = self._roster.one(Role.TARGET_FINDER)
            body = open_sealed_signed(
                self._opener, attestation, ATTESTATION_BYTES, tf.name, tf.verify_key, "target count"
            )
            state.attested = get_field(body, "targets", int, "target count")
            if body.get("query_id") != envelope.query_id or state.attested < 0:
                raise malformed("target count does not match the round")
            self._charge(state, envelope.querier)
        elif attestation:
            raise malformed("only the root aggregator takes the target count")
        with self._lock:
            if envelope.query_id in self._rounds:
                raise DispersError(ErrorCode.REPLAY, "round was already prepared (replay)")
            self._rounds[envelope.query_id] = state
            qid = envelope.query_id
            state.timer = EXPIRY.schedule(self._settings.query_timeout_s, lambda: self._forget(qid))

    def _charge(self, state: _Round, querier: str) -> None:
        """The root's privacy check: DP policy, run bookkeeping and the ledger charge."""
        spec = state.spec
        if spec.noise_multiplier is None:
            if self._settings.dp:
                raise malformed(
                    "federated evaluation under the cluster's DP policy needs noise "
                    "(privacy.user_level and evaluation.noise_multiplier)"
                    if spec.task == "evaluate"
                    else "training under the cluster's DP policy needs user-level noise "
                    "(privacy.user_level with a noise multiplier and a clip norm)"
                )
            params = None
        else:
            if self._settings.dp and spec.delta > self._settings.max_delta:
                raise malformed(
                    f"training: delta is above the cluster's maximum {self._settings.max_delta:g}"
                )
            rate = min(1.0, spec.cohort / max(1, state.attested or 0))
            params = UserLevelDP(spec.noise_multiplier, rate, spec.delta, spec.accountant)
        key = (querier, spec.run_id)
        with self._lock:
            run = self._runs.get(key)
            # Checked before a run is replaced: a run's rounds in flight count on that run only.
            if run is not None and run.in_flight is not None:
                raise DispersError(ErrorCode.FAILED_PRECONDITION, "a round of this run is already running")
            if run is None or run.params != params:
                run = self._runs[key] = _Run(querier, params)  # new parameters: accounted afresh
            if spec.round != run.rounds:
                raise DispersError(
                    ErrorCode.FAILED_PRECONDITION, f"this run's next round is {run.rounds}, not {spec.round}"
                )
            run.in_flight = spec.query_id
        state.dp = params
        state.run = run
        if params is None:
            return
        eps, delta = round_charge(params, run.rounds)
        total = Spend(self._settings.budget_epsilon, self._settings.budget_delta)
        try:
            status = self._ledger.charge(querier, spec.query_id, Spend(eps, delta), total)
        except DispersError as exc:
            with self._lock:
                run.in_flight = None
            if exc.code is ErrorCode.BUDGET_EXCEEDED:
                left = self._ledger.status(querier, total).left
                raise DispersError(
                    exc.code,
                    f"training stopped before {'evaluation' if spec.task == 'evaluate' else 'round'} "
                    f"{spec.round + 1}: it would spend epsilon {eps:.4g} "
                    f"(delta {delta:g}) and the querier's budget has epsilon {left.epsilon:.4g} "
                    f"(delta {left.delta:g}) left",
                ) from None
            raise
        state.charged = (eps, delta)
        state.left = status.left.epsilon

    def ingest(self, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        """Open and check a batch of sealed updates; bad ones are dropped and counted, never fatal."""
        state = self._state(query_id)
        if state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "only leaf aggregators take updates")
        if state.forwarded is not None:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "the Target closed this round's stream")
        if len(ciphertexts) > self._settings.batch_size:
            raise malformed(f"an ingest batch holds at most {self._settings.batch_size} items")
        spec = state.spec
        layout = spec.layout
        item_size = sealed_size(layout.size)
        expected = bytes.fromhex(query_id)
        partial = state.partial
        with state.lock:
            fresh: list[bytes] = []
            for ciphertext in ciphertexts:
                if not isinstance(ciphertext, bytes) or len(ciphertext) != item_size:
                    partial.drop("malformed")
                    continue
                digest = hashlib.blake2b(ciphertext, digest_size=16).digest()
                if digest in state.seen:
                    partial.drop("duplicate")
                    continue
                state.seen.add(digest)
                fresh.append(ciphertext)
            opened: list[bytes] = []
            for plaintext in self._opener.open_many(fresh, "model update"):
                if plaintext is None:
                    partial.drop("unopenable")
                elif len(plaintext) != layout.size:
                    partial.drop("malformed")
                else:
                    opened.append(plaintext)
            batch = layout.decode_many(opened)
            ours = np.fromiter((q == expected for q in batch.query_ids), dtype=bool, count=len(opened))
            partial.drop("malformed", int((~batch.valid).sum()))
            partial.drop("wrong_query", int((batch.valid & ~ours).sum()))
            mine = batch.valid & ours
            updates = mine & ~batch.declined
            weight = batch.values[:, -1] if len(opened) else np.zeros(0)
            sound = (batch.groups == 0) & np.isfinite(batch.values).all(axis=1)
            sound &= (weight > 0) & (weight <= spec.max_weight)
            if spec.weighting == "uniform":
                sound &= weight == 1.0
            if spec.task == "evaluate" and len(opened):
                # (loss / MAX_LOSS, correct, examples): whole counts, 0 <= correct <= examples
                # and 0 <= loss <= examples (each record's loss is capped at MAX_LOSS).
                loss, correct = batch.values[:, 0], batch.values[:, 1]
                with np.errstate(invalid="ignore"):
                    sound &= (weight == np.round(weight)) & (correct == np.round(correct))
                    sound &= (correct >= 0) & (correct <= weight) & (loss >= 0) & (loss <= weight)
            elif spec.clip is not None and len(opened):
                norms = np.linalg.norm(batch.values[:, :-1], axis=1)
                sound &= norms <= spec.clip * np.maximum(weight, 0) * (1 + NORM_SLACK)
            partial.drop("out_of_bounds", int((updates & ~sound).sum()))
            partial.add(batch.values[updates & sound])
            partial.declines += int((mine & batch.declined).sum())
            partial.cut += int((mine & batch.declined & (batch.groups == DECLINE_CUT)).sum())
        return len(ciphertexts)

    def end_ingest(self, query_id: str, forwarded: int) -> None:
        """T's word that every update of this round was forwarded here, and how many."""
        state = self._state(query_id)
        if state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "only leaf aggregators take updates")
        if not isinstance(forwarded, int) or forwarded < 0:
            raise malformed("the number of items forwarded must be a non-negative integer")
        with state.lock:
            if state.forwarded is not None:
                raise DispersError(ErrorCode.REPLAY, "the stream of updates was already closed (replay)")
            state.forwarded = forwarded

    def absorb(self, query_id: str, child: str, sealed_partial: bytes) -> None:
        """Merge a child DA's sum of updates (sealed to this DA and signed by the child)."""
        state = self._state(query_id)
        if child not in state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "not a child of this aggregator in the plan")
        what = "partial sum of updates"
        key = self._roster.require(child, Role.DATA_AGGREGATOR).verify_key
        body = open_sealed_signed(
            self._opener, sealed_partial, round_frame_bytes(state.spec.n_params), child, key, what
        )
        if body.get("query_id") != query_id or body.get("spec") != state.spec_digest:
            raise malformed(f"{what} belongs to another round")
        partial = UpdateSum.from_obj(body.get("partial"), state.spec.sum_size)
        if partial.weight > state.spec.max_weight * partial.count * (1 + NORM_SLACK):
            raise malformed(f"{what} carries more weight than its updates may")
        with state.lock:
            if child in state.received_children:
                raise DispersError(ErrorCode.REPLAY, "partial from this child already merged (replay)")
            state.partial.merge(partial)
            state.received_children.add(child)

    def finalize(self, query_id: str) -> bytes:
        """Seal the sum to the parent, or (root) release the round's average sealed to Q."""
        state = self._state(query_id)
        missing = state.expected_children - state.received_children
        if missing:
            raise DispersError(
                ErrorCode.FAILED_PRECONDITION, f"waiting for partials from {len(missing)} child aggregator(s)"
            )
        if not state.expected_children and state.forwarded != state.partial.items:
            raise DispersError(
                ErrorCode.FAILED_PRECONDITION,
                "the Target has not closed this round's stream"
                if state.forwarded is None
                else "this aggregator holds a number of updates other than the Target forwarded",
            )
        with self._lock:
            if self._rounds.get(query_id) is not state:
                raise DispersError(ErrorCode.NOT_FOUND, "this aggregator holds no such round")
            del self._rounds[query_id]
            state.released = True
        if state.timer is not None:
            state.timer.cancel()
        spec = state.spec
        parent = state.envelope.plan.parent(self.name)
        with state.lock:
            if parent is not None:
                body = {"query_id": query_id, "partial": state.partial.to_obj(), "spec": state.spec_digest}
                return seal_signed(
                    self._roster.require(parent, Role.DATA_AGGREGATOR).sealing_key, self._keys.signing,
                    self.name, body, round_frame_bytes(spec.n_params), "partial sum of updates",
                )  # fmt: skip
            if state.run is not None:
                with self._lock:
                    _count_round(state.run, query_id)
            assert state.attested is not None
            if state.partial.items > state.attested:
                raise DispersError(
                    ErrorCode.FAILED_PRECONDITION,
                    "the round rests on more updates than the Target Finder attested targets; "
                    "no model is released",
                )
            if spec.task == "evaluate":
                return self._release_evaluation(state)
            if not self._settings.dp and state.partial.count < spec.k:
                # The update is exact under this policy: fewer than k contributors could be one
                # person's. (Under DP it is noised for user-level DP, and the cohort is >= k.)
                raise DispersError(
                    ErrorCode.TOO_FEW_TARGETS,
                    "the round has fewer contributors than k; no model is released",
                )
            avg = average(
                state.partial, noise_multiplier=spec.noise_multiplier, clip=spec.clip, cohort=spec.cohort
            )
            return self._sealed_release(state, query_id, avg, {})

    def _release_evaluation(self, state: _Round) -> bytes:
        """The root's release of an evaluation round: the sums of loss, correct and examples,
        noised under DP (calibrated to one instance's bound, charged at prepare), never from
        fewer than k contributors."""
        from dispers.learn.evaluation import release_sums

        spec, p = state.spec, state.partial
        if p.count < spec.k:
            raise DispersError(
                ErrorCode.TOO_FEW_TARGETS,
                "the evaluation has fewer contributors than k; nothing is released",
            )
        sums = release_sums(
            np.array([p.total[0], p.total[1], p.weight]),
            noise_multiplier=spec.noise_multiplier,
            max_examples=spec.max_examples,
        )
        return self._sealed_release(state, spec.query_id, sums, {"task": "evaluate"})

    def _sealed_release(
        self, state: _Round, query_id: str, vector: npt.NDArray[np.float64], extra: dict[str, object]
    ) -> bytes:
        """A round's release sealed to Q: the released vector, the run's privacy spent, and the
        exact counts only where the cluster's policy is not DP."""
        spec, p = state.spec, state.partial
        exact = not self._settings.dp
        released: dict[str, object] = {
            "query_id": query_id,
            "run_id": spec.run_id,
            "round": spec.round,
            **extra,
            "average": base64.b64encode(vector.astype("<f8").tobytes()).decode(),
            "asked": spec.cohort,
            "contributed": p.count if exact else None,
            "declined": p.declines if exact else None,
            "dropped": sum(p.dropped.values()) if exact else None,
            "cut": p.cut if exact else None,
            "epsilon_charged": state.charged[0] if state.charged else 0.0,
            "epsilon_run": epsilon_after(state.dp, spec.round + 1) if state.dp else 0.0,
            "budget_left": state.left,
        }
        return seal_signed(
            state.envelope.querier_sealing_key, self._keys.signing, self.name, released,
            round_frame_bytes(spec.n_params), "round result",
        )  # fmt: skip

    def abort(self, query_id: str) -> None:
        """Forget a round (idempotent); a charged round stays charged."""
        self._forget(query_id)

    def _forget(self, query_id: str) -> None:
        with self._lock:
            state = self._rounds.pop(query_id, None)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        run = state.run
        if run is not None:
            with self._lock:
                if state.charged is not None:
                    # No refund (as for queries): instances may have trained, and whether the
                    # round then failed could depend on their data. The charge stands, so the
                    # round counts: the run's next round is charged the next increment.
                    _count_round(run, query_id)
                elif run.in_flight == query_id:
                    run.in_flight = None


def _digest(spec: TrainingSpec) -> str:
    from dispers.core.codec import dumps

    return hashlib.blake2b(dumps(spec.to_obj()), digest_size=16).hexdigest()
