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
from dispers.crypto import ActorKeys, Opener
from dispers.protocol.aggregation.release import plan_noise
from dispers.protocol.api import ConductorAPI, QuerierAPI, QueryOutcome
from dispers.protocol.authz import authorize
from dispers.protocol.common import check_privacy, open_sealed_signed, seal_padded
from dispers.protocol.instance.functions import FIELDS as GROUP_FIELDS
from dispers.protocol.instance.functions import FUNCTIONS, validate_params
from dispers.protocol.learning.messages import RoundResult
from dispers.protocol.learning.querier import RoundPlan
from dispers.state.queries import QueryRecord

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
        """Seal every part of the query to its reader, padded to the cluster's fixed sizes, and
        sign the whole. A concept outside the public vocabulary is refused before anything
        is sealed."""
        settings = self._settings
        check_spec_names(spec)
        for i, f in enumerate(spec.all_fields):
            try:
                validate_params(f.function, f.params)
            except DispersError as exc:
                where = "data." if not spec.fields else f"data.fields[{i}]."
                raise DispersError(exc.code, f"query spec: {where}params: {exc.message}") from None
        if len(spec.all_fields) > settings.max_fields:
            raise malformed(
                f"query spec: data.fields: at most {settings.max_fields} fields (cluster.max_fields)"
            )
        if spec.k < settings.k_min:
            raise malformed(f"query spec: query.k = {spec.k} is below the cluster minimum {settings.k_min}")
        concepts, expression = spec.compiled()
        vocabulary = set(settings.vocabulary)
        for concept in concepts:
            if concept not in vocabulary:
                raise DispersError(
                    ErrorCode.UNKNOWN_CONCEPT,
                    f"query spec: concept {concept[:64]!r} is not in the cluster's vocabulary "
                    f"(`dispers concepts` lists it: {', '.join(settings.vocabulary)})",
                )
        check_privacy(spec.privacy, spec.stats, settings, what="query spec")
        if spec.bins and len(spec.bins) - 1 > settings.max_bins:
            raise malformed(f"query spec: at most {settings.max_bins} bins (cluster.max_bins)")
        if len(spec.groups) > settings.max_groups:
            raise malformed(f"query spec: at most {settings.max_groups} groups (cluster.max_groups)")
        if len(concepts) > settings.max_concepts:
            raise malformed(f"query spec: the target names more than {settings.max_concepts} concepts")
        roster = self.roster()
        if spec.plan is None:
            plan = roster.da_plan()
        else:
            plan = roster.plan_tree(spec.plan.n_leaves, spec.plan.fan_out)
        qid = query_id or new_query_id()
        request = DataRequest(
            query_id=qid,
            function=spec.function,
            params=dict(spec.params),
            as_of=spec.as_of,
            group_by=spec.group_by,
            aggregators=plan.leaves,
            issued_at=time.time(),
            extra_fields=tuple((f.function, dict(f.params)) for f in spec.all_fields[1:]),
        )
        request_bytes = dumps(request.to_obj())
        signature = self._keys.signing.sign(request_signing_bytes(request_bytes))
        agg = AggregateSpec(
            qid, spec.k, spec.bounds, spec.stats, spec.groups, request.layout.n_fields,
            bins=spec.bins, quantiles=spec.quantiles,
            field_names=tuple(f.name for f in spec.fields),
            field_bounds=tuple(f.bounds for f in spec.fields),
            regression=spec.regression,
            clip=spec.out_of_bounds == "clip",
        )  # fmt: skip
        if settings.dp:
            try:
                plan_noise(agg, spec.privacy)  # bounds too narrow to calibrate: refused now, not at release
            except DispersError as exc:
                raise malformed(f"query spec: aggregate.bounds: {exc.message}") from None
        unsigned = QueryEnvelope(
            query_id=qid,
            querier=self.name,
            created_at=time.time(),
            k=spec.k,
            sealed_concepts=seal_padded(
                roster.one(Role.CONCEPT_INDEXOR).sealing_key,
                {"query_id": qid, "concepts": list(concepts)},
                settings.concepts_bytes,
                "query spec: the target's concept list",
            ),
            sealed_expression=seal_padded(
                roster.one(Role.TARGET_FINDER).sealing_key,
                {"query_id": qid, "expression": expression},
                settings.expression_bytes,
                "query spec: the target expression",
            ),
            sealed_request=seal_padded(
                roster.one(Role.TARGET).sealing_key,
                {"request": base64.b64encode(request_bytes).decode(), "signature": signature.hex()},
                settings.request_bytes,
                "query spec: the data request",
            ),
            sealed_specs=tuple(
                (
                    da,
                    seal_padded(
                        roster.get(da).sealing_key, agg.to_obj(), settings.spec_bytes, "query spec: aggregate"
                    ),
                )
                for da in plan.members
            ),
            plan=plan,
            querier_sealing_key=self._keys.sealing.public,
            querier_verify_key=self._keys.signing.verify_key,
            privacy=spec.privacy,
        )
        return _with_signature(unsigned, self._keys.signing.sign(unsigned.signing_bytes()))

    def submit(self, caller: str, spec: QuerySpec) -> str:
        """Build and submit a query; returns its id (only this querier's own operator may ask)."""
        authorize(self._roster_for_authz(), caller, "querier.submit", callee=self.name)
        return self._conductor.submit(self.build(spec))

    def _roster_for_authz(self) -> Roster:
        # Our own config's roster when we have one: no need to ask the Conductor who we are.
        return self._pinned if self._pinned is not None else self.roster()

    def open_result(self, query_id: str, sealed_result: bytes) -> QueryResult:
        """Open the root DA's sealed result and check the root signed it."""
        roster = self.roster()
        root = roster.da_plan().root
        what = "query result"
        body = open_sealed_signed(
            self._opener, sealed_result, self._settings.result_bytes, root, roster.get(root).verify_key, what
        )
        if body.get("query_id") != query_id:
            raise malformed(f"{what} belongs to another query")
        result_obj = body.get("result")
        if not isinstance(result_obj, dict):
            raise malformed(f"{what} is malformed")
        return QueryResult.from_obj(result_obj)

    def outcome(self, caller: str, query_id: str, wait_s: float = 0.0) -> QueryOutcome:
        """C's record of the query, with the opened result once it is done."""
        authorize(self._roster_for_authz(), caller, "querier.outcome", callee=self.name)
        record = self._conductor.status(query_id, wait_s)
        result = None
        if record.state == "done" and record.sealed_result is not None:
            result = self.open_result(query_id, record.sealed_result)
        return QueryOutcome(record, result)

    # --- federated training (dispers.protocol.learning.querier) --------------------------------

    def submit_round(self, caller: str, plan: RoundPlan) -> str:
        """Build, seal, sign and submit one training round; returns its id."""
        from dispers.protocol.learning.api import as_round_conductor
        from dispers.protocol.learning.querier import build_round

        authorize(self._roster_for_authz(), caller, "querier.submit_round", callee=self.name)
        training_round = build_round(self._keys, self.roster(), self._settings, plan)
        return as_round_conductor(self._conductor).submit_round(training_round)

    def round_outcome(
        self, caller: str, query_id: str, n_params: int, wait_s: float = 0.0
    ) -> tuple[QueryRecord, RoundResult | None]:
        """C's record of a round, with the opened average update once it is done."""
        from dispers.protocol.learning.querier import open_round_result

        authorize(self._roster_for_authz(), caller, "querier.round_outcome", callee=self.name)
        record = self._conductor.status(query_id, wait_s)
        result = None
        if record.state == "done" and record.sealed_result is not None:
            result = open_round_result(
                self._opener, self.roster(), self._settings, query_id, record.sealed_result, n_params
            )
        return record, result


def check_spec_names(spec: QuerySpec) -> None:
    """The names Querier.build checks, checked where the researcher is, before any actor is
    asked (the CLI and dispers.Client): an unknown function or group-by field is refused with
    the valid ones listed (the public registries: no person's data)."""
    for i, f in enumerate(spec.all_fields):
        if f.function not in FUNCTIONS:
            where = "data." if not spec.fields else f"data.fields[{i}]."
            raise DispersError(
                ErrorCode.NOT_FOUND,
                f"query spec: {where}function: unknown local function {f.function[:64]!r} "
                f"(`dispers functions` lists them: {', '.join(sorted(FUNCTIONS))})",
            )
    level, key = spec.group_by, "data.group_by"
    while level is not None:
        if level.field not in GROUP_FIELDS:
            raise DispersError(
                ErrorCode.NOT_FOUND,
                f"query spec: {key}.field: unknown group-by field {level.field[:64]!r} "
                f"(the fields are: {', '.join(sorted(GROUP_FIELDS))})",
            )
        level, key = level.then, f"{key}.then"


def run_query(querier: QuerierAPI, spec: QuerySpec, *, timeout_s: float = 300.0) -> QueryOutcome:
    """Submit through any Querier (object or gRPC client) and wait until the query ends."""
    query_id = querier.submit(spec)
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        asked = time.monotonic()
        outcome = querier.outcome(query_id, wait_s=min(30.0, max(0.0, deadline - asked)))
        if outcome.record.state in ("done", "refused", "failed") or time.monotonic() >= deadline:
            return outcome
        if time.monotonic() - asked < pause:  # the Conductor answered at once (too many waiters)
            time.sleep(pause)
            pause = min(2.0, pause * 2)


def _with_signature(envelope: QueryEnvelope, signature: bytes) -> QueryEnvelope:
    return dataclasses.replace(envelope, signature=signature)
