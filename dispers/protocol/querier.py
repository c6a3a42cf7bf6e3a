"""Querier: holds the researcher's keys, turns a QuerySpec into a sealed signed query, opens results."""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
import time

from dispers.core.codec import dumps
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, new_query_id
from dispers.core.messages import QueryEnvelope, request_signing_bytes
from dispers.core.spec import AggregateSpec, DataRequest, QueryResult, QuerySpec
from dispers.crypto import ActorKeys, Opener, seal
from dispers.protocol.api import ConductorAPI, QuerierAPI, QueryOutcome
from dispers.protocol.common import open_signed
from dispers.protocol.instance.functions import get_function, validate_params

log = logging.getLogger(__name__)


class Querier:
    """Q learns the final result and nothing per person."""

    def __init__(
        self,
        keys: ActorKeys,
        conductor: ConductorAPI,
        settings: ClusterSettings,
        *,
        pinned_roster: Roster | None = None,
    ) -> None:
        self.name = keys.name
        self._keys = keys
        self._opener = Opener(keys.name, keys.sealing)
        self._conductor = conductor
        self._settings = settings
        self._roster: Roster | None = None
        # The roster of our own cluster config, when we have one: the Conductor must serve the
        # same, or it could hand us its own keys as CI's, TF's, T's or a DA's.
        self._pinned = pinned_roster
        self._lock = threading.Lock()

    def roster(self) -> Roster:
        """The roster, fetched once from the Conductor and checked against our own keys."""
        with self._lock:
            if self._roster is None:
                roster = self._conductor.get_roster()
                me = roster.require(self.name, Role.QUERIER)
                if (
                    me.sealing_key != self._keys.sealing.public
                    or me.verify_key != self._keys.signing.verify_key
                ):
                    raise DispersError(ErrorCode.CONFIG, "the roster's keys for this querier are not ours")
                if self._pinned is not None and roster != self._pinned:
                    raise DispersError(
                        ErrorCode.CONFIG,
                        "the Conductor serves a roster that differs from this querier's config",
                    )
                self._roster = roster
            return self._roster

    def build(self, spec: QuerySpec, *, query_id: str | None = None) -> QueryEnvelope:
        """Seal every part of the query to its reader and sign the whole."""
        get_function(spec.function)
        validate_params(spec.function, spec.params)
        if spec.k < self._settings.k_min:
            raise malformed(f"query spec: k={spec.k} is below the cluster minimum {self._settings.k_min}")
        roster = self.roster()
        plan = roster.da_plan()
        qid = query_id or new_query_id()
        concepts, expression = spec.compiled()
        request = DataRequest(
            query_id=qid,
            function=spec.function,
            params=dict(spec.params),
            as_of=spec.as_of,
            group_by=spec.group_by,
            aggregators=plan.leaves,
            issued_at=time.time(),
        )
        request_bytes = dumps(request.to_obj())
        signature = self._keys.signing.sign(request_signing_bytes(request_bytes))
        agg = AggregateSpec(qid, spec.k, spec.bounds, spec.stats, spec.groups)
        unsigned = QueryEnvelope(
            query_id=qid,
            querier=self.name,
            created_at=time.time(),
            k=spec.k,
            sealed_concepts=seal(
                roster.one(Role.CONCEPT_INDEXOR).sealing_key,
                dumps({"query_id": qid, "concepts": list(concepts)}),
            ),
            sealed_expression=seal(
                roster.one(Role.TARGET_FINDER).sealing_key,
                dumps({"query_id": qid, "expression": expression}),
            ),
            sealed_request=seal(
                roster.one(Role.TARGET).sealing_key,
                dumps(
                    {
                        "request": base64.b64encode(request_bytes).decode(),
                        "signature": signature.hex(),
                    }
                ),
            ),
            sealed_specs=tuple(
                (da, seal(roster.get(da).sealing_key, dumps(agg.to_obj()))) for da in plan.members
            ),
            plan=plan,
            querier_sealing_key=self._keys.sealing.public,
            querier_verify_key=self._keys.signing.verify_key,
        )
        return _with_signature(unsigned, self._keys.signing.sign(unsigned.signing_bytes()))

    def submit(self, spec: QuerySpec) -> str:
        """Build and submit a query; returns its id."""
        return self._conductor.submit(self.build(spec))

    def open_result(self, query_id: str, sealed_result: bytes) -> QueryResult:
        """Open the root DA's sealed result and check the root signed it."""
        roster = self.roster()
        root = roster.da_plan().root
        what = "query result"
        body = open_signed(self._opener.open(sealed_result, what), root, roster.get(root).verify_key, what)
        if body.get("query_id") != query_id:
            raise malformed(f"{what} belongs to another query")
        result_obj = body.get("result")
        if not isinstance(result_obj, dict):
            raise malformed(f"{what} is malformed")
        return QueryResult.from_obj(result_obj)

    def outcome(self, query_id: str, wait_s: float = 0.0) -> QueryOutcome:
        """C's record of the query, with the opened result once it is done."""
        record = self._conductor.status(query_id, wait_s)
        result = None
        if record.state == "done" and record.sealed_result is not None:
            result = self.open_result(query_id, record.sealed_result)
        return QueryOutcome(record, result)

    def run(self, spec: QuerySpec, *, timeout_s: float = 300.0) -> QueryOutcome:
        """Submit and wait for the outcome (the small Python API)."""
        return run_query(self, spec, timeout_s=timeout_s)


def run_query(querier: QuerierAPI, spec: QuerySpec, *, timeout_s: float = 300.0) -> QueryOutcome:
    """Submit through any Querier (object or gRPC client) and wait until the query ends."""
    query_id = querier.submit(spec)
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = querier.outcome(query_id, wait_s=min(30.0, max(0.0, deadline - time.monotonic())))
        if outcome.record.state in ("done", "refused", "failed") or time.monotonic() >= deadline:
            return outcome


def _with_signature(envelope: QueryEnvelope, signature: bytes) -> QueryEnvelope:
    return dataclasses.replace(envelope, signature=signature)
