"""Data Aggregator: opens contributions, checks bounds, folds partials in memory, passes them up."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dispers.core.codec import dumps, loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, check_query_id
from dispers.core.messages import QueryEnvelope
from dispers.core.spec import AggregateSpec
from dispers.crypto import ActorKeys, Opener, seal
from dispers.protocol.aggregation.partial import Partial
from dispers.protocol.common import ReplayGuard, open_signed, sign_payload, verify_envelope

log = logging.getLogger(__name__)


@dataclass
class _QueryState:
    """Everything a DA holds for one query: in memory only, dropped at finalize or abort."""

    spec: AggregateSpec
    envelope: QueryEnvelope
    partial: Partial
    expected_children: frozenset[str]
    received_children: set[str] = field(default_factory=set)
    seen: set[bytes] = field(default_factory=set)  # digests of ciphertexts, against duplicates
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _valid_group(g: object, n_groups: int) -> bool:
    return isinstance(g, int) and not isinstance(g, bool) and 0 <= g < n_groups


def _finite_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def encode_contribution(query_id: str, group: int, value: float) -> bytes:
    """The plaintext an instance seals to its DA."""
    return dumps({"q": query_id, "g": group, "v": value})


class DataAggregator:
    """A DA learns the values it is given, never who gave them; it writes none of them to disk."""

    def __init__(self, keys: ActorKeys, roster: Roster, settings: ClusterSettings) -> None:
        self.name = keys.name
        self._keys = keys
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._queries: dict[str, _QueryState] = {}
        self._lock = threading.Lock()
        self._replays = ReplayGuard(settings.max_query_age_s * 2)

    @property
    def active_queries(self) -> int:
        """How many queries this DA holds state for (tests check it returns to 0)."""
        return len(self._queries)

    def _expire(self) -> None:
        now = time.time()
        for qid in [q for q, s in self._queries.items() if now - s.started > self._settings.query_timeout_s]:
            log.warning("query %s: state expired unfinished", qid[:8])
            del self._queries[qid]

    def _state(self, query_id: str) -> _QueryState:
        check_query_id(query_id)
        with self._lock:
            state = self._queries.get(query_id)
        if state is None:
            raise DispersError(ErrorCode.NOT_FOUND, "this aggregator holds no such query")
        return state

    def prepare(self, envelope: QueryEnvelope) -> None:
        """Verify the query and open this DA's aggregate spec."""
        verify_envelope(envelope, self._roster, self._settings)
        if self.name not in envelope.plan.members:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "this aggregator is not in the query's plan")
        self._replays.check(envelope.query_id, "query")
        what = "aggregate spec"
        spec = AggregateSpec.from_obj(
            loads_object(self._opener.open(envelope.spec_for(self.name), what), what)
        )
        if spec.query_id != envelope.query_id or spec.k != envelope.k:
            raise malformed(f"{what} does not match the query")
        with self._lock:
            self._expire()
            if envelope.query_id in self._queries:
                raise DispersError(ErrorCode.REPLAY, "query was already prepared (replay)")
            self._queries[envelope.query_id] = _QueryState(
                spec=spec,
                envelope=envelope,
                partial=Partial.empty(len(spec.groups)),
                expected_children=frozenset(envelope.plan.children(self.name)),
            )
            self._replays.record(envelope.query_id)

    def ingest(self, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        """Open and fold a batch of contributions; bad ones are dropped and counted, not reported.

        The counts of dropped contributions reach only Q, inside the sealed result: telling T
        which batch held an out-of-bounds value would tell it something about a value.
        """
        state = self._state(query_id)
        if state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "only leaf aggregators take contributions")
        spec = state.spec
        lo, hi = spec.bounds
        n_groups = len(spec.groups)
        groups: list[int] = []
        values: list[float] = []
        dropped: dict[str, int] = {}

        def drop(reason: str) -> None:
            dropped[reason] = dropped.get(reason, 0) + 1

        with state.lock:
            for ciphertext in ciphertexts:
                digest = hashlib.blake2b(ciphertext, digest_size=16).digest()
                if digest in state.seen:
                    drop("duplicate")
                    continue
                state.seen.add(digest)
                plaintext = self._opener.try_open(ciphertext, "contribution")
                if plaintext is None:
                    drop("unopenable")
                    continue
                try:
                    obj = json.loads(plaintext)
                    q, g, v = obj["q"], obj["g"], obj["v"]
                except (ValueError, TypeError, KeyError):
                    drop("malformed")
                    continue
                if q != query_id:
                    drop("wrong_query")
                elif not _valid_group(g, n_groups) or not _finite_number(v):
                    drop("malformed")
                elif not lo <= v <= hi:
                    drop("out_of_bounds")
                else:
                    groups.append(g)
                    values.append(float(v))
            state.partial.add(np.asarray(groups, dtype=np.int64), np.asarray(values))
            for reason, n in dropped.items():
                state.partial.drop(reason, n)
        return len(ciphertexts)

    def absorb(self, query_id: str, child: str, sealed_partial: bytes) -> None:
        """Merge a child DA's partial (sealed to this DA and signed by the child)."""
        state = self._state(query_id)
        if child not in state.expected_children:
            raise DispersError(ErrorCode.FAILED_PRECONDITION, "not a child of this aggregator in the plan")
        what = "partial aggregate"
        child_key = self._roster.require(child, Role.DATA_AGGREGATOR).verify_key
        body = open_signed(self._opener.open(sealed_partial, what), child, child_key, what)
        if body.get("query_id") != query_id:
            raise malformed(f"{what} belongs to another query")
        partial = Partial.from_obj(body.get("partial"), len(state.spec.groups))
        with state.lock:
            if child in state.received_children:
                raise DispersError(ErrorCode.REPLAY, "partial from this child already merged (replay)")
            state.partial.merge(partial)
            state.received_children.add(child)

    def finalize(self, query_id: str) -> bytes:
        """Seal the partial to the parent, or (root) release the result sealed to Q; then forget."""
        state = self._state(query_id)
        missing = state.expected_children - state.received_children
        if missing:
            raise DispersError(
                ErrorCode.FAILED_PRECONDITION,
                f"waiting for partials from {len(missing)} child aggregator(s)",
            )
        parent = state.envelope.plan.parent(self.name)
        with state.lock:
            if parent is None:
                result = state.partial.release(state.spec)
                body = {"query_id": query_id, "result": result.to_obj()}
                recipient = state.envelope.querier_sealing_key
            else:
                body = {"query_id": query_id, "partial": state.partial.to_obj()}
                recipient = self._roster.require(parent, Role.DATA_AGGREGATOR).sealing_key
            ciphertext = seal(recipient, sign_payload(self._keys.signing, self.name, body))
        self.abort(query_id)
        return ciphertext

    def abort(self, query_id: str) -> None:
        """Forget everything about a query (idempotent)."""
        with self._lock:
            self._queries.pop(query_id, None)
