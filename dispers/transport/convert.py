"""The one place dataclasses become protobuf messages and back; from-proto validates structure."""

from __future__ import annotations

from collections.abc import Iterable

from dispers.core.codec import dumps, loads_object
from dispers.core.config import DAPlan, Roster, RosterEntry
from dispers.core.errors import DispersError, malformed
from dispers.core.ids import Role, check_name, check_query_id
from dispers.core.messages import (
    BatchHeader,
    CollectReport,
    ContributionBatch,
    ContributionRequest,
    FoundTargets,
    QueryEnvelope,
    SignedItems,
    SubscriptionBatch,
    SubscriptionItem,
    SubscriptionOp,
)
from dispers.core.spec import Privacy, QueryResult, QuerySpec, parse_query_spec
from dispers.crypto.keys import SealingPublicKey, VerifyKey
from dispers.proto import common_pb2 as pb
from dispers.proto import querier_pb2
from dispers.protocol.api import QueryOutcome
from dispers.state.queries import QUERY_STATES, QueryRecord

# Enums: explicit tables, so renaming a Python member can never silently change the wire.
_OPS: dict[SubscriptionOp, pb.SubscriptionOp.ValueType] = {
    SubscriptionOp.SUBSCRIBE: pb.SUBSCRIPTION_OP_SUBSCRIBE,
    SubscriptionOp.UNSUBSCRIBE: pb.SUBSCRIPTION_OP_UNSUBSCRIBE,
}
_OPS_BACK = {v: k for k, v in _OPS.items()}

_ROLES: dict[Role, pb.Role.ValueType] = {
    Role.QUERIER: pb.ROLE_QUERIER,
    Role.CONDUCTOR: pb.ROLE_CONDUCTOR,
    Role.CONCEPT_INDEXOR: pb.ROLE_CONCEPT_INDEXOR,
    Role.TARGET_FINDER: pb.ROLE_TARGET_FINDER,
    Role.TARGET: pb.ROLE_TARGET,
    Role.DATA_AGGREGATOR: pb.ROLE_DATA_AGGREGATOR,
    Role.PERSONAL_CLOUD: pb.ROLE_PERSONAL_CLOUD,
}
_ROLES_BACK = {v: k for k, v in _ROLES.items()}


def _count(value: int, what: str) -> int:
    if value < 0:
        raise malformed(f"{what} must not be negative")
    return value


def _positive(value: int, what: str) -> int:
    if value < 1:
        raise malformed(f"{what} must be at least 1")
    return value


def _cohort(value: int) -> int:
    if value < 0:
        raise malformed("a round's cohort must not be negative")
    return value


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    return tuple(check_name(v, what) for v in values)


# --- enums -------------------------------------------------------------------------------------


def op_to_proto(op: SubscriptionOp) -> pb.SubscriptionOp.ValueType:
    """SubscriptionOp -> its wire enum."""
    return _OPS[op]


def op_from_proto(value: int) -> SubscriptionOp:
    """Wire enum -> SubscriptionOp; MALFORMED when unset or unknown."""
    try:
        return _OPS_BACK[pb.SubscriptionOp.ValueType(value)]
    except KeyError:
        raise malformed("subscription op is unset or unknown") from None


def role_to_proto(role: Role) -> pb.Role.ValueType:
    """Role -> its wire enum."""
    return _ROLES[role]


def role_from_proto(value: int) -> Role:
    """Wire enum -> Role; MALFORMED when unset or unknown."""
    try:
        return _ROLES_BACK[pb.Role.ValueType(value)]
    except KeyError:
        raise malformed("role is unset or unknown") from None


# --- roster and plan ---------------------------------------------------------------------------


def roster_entry_to_proto(entry: RosterEntry) -> pb.RosterEntry:
    """RosterEntry -> proto."""
    return pb.RosterEntry(
        name=entry.name,
        role=role_to_proto(entry.role),
        endpoint=entry.endpoint,
        sealing_key=entry.sealing_key.raw,
        verify_key=entry.verify_key.raw,
        parent=entry.parent,
    )


def roster_entry_from_proto(msg: pb.RosterEntry) -> RosterEntry:
    """Proto -> RosterEntry (names and keys checked)."""
    return RosterEntry(
        name=check_name(msg.name),
        role=role_from_proto(msg.role),
        endpoint=msg.endpoint,
        sealing_key=SealingPublicKey(msg.sealing_key),
        verify_key=VerifyKey(msg.verify_key),
        parent=check_name(msg.parent, "parent name") if msg.HasField("parent") else None,
    )


def roster_to_proto(roster: Roster) -> pb.Roster:
    """Roster -> proto."""
    return pb.Roster(entries=[roster_entry_to_proto(e) for e in roster.entries])


def roster_from_proto(msg: pb.Roster) -> Roster:
    """Proto -> Roster; MALFORMED if an entry is bad or a name appears twice."""
    entries = tuple(roster_entry_from_proto(e) for e in msg.entries)
    try:
        return Roster(entries)
    except DispersError as exc:  # Roster reports CONFIG; from the wire it is a bad message
        raise malformed(f"roster: {exc.message}") from None


def plan_to_proto(plan: DAPlan) -> pb.DAPlan:
    """DAPlan -> proto."""
    return pb.DAPlan(root=plan.root, parents=[pb.PlanEdge(child=c, parent=p) for c, p in plan.parents])


def plan_from_proto(msg: pb.DAPlan) -> DAPlan:
    """Proto -> DAPlan, validated (one root, no dangling parent, no cycle)."""
    plan = DAPlan(
        root=check_name(msg.root, "plan root"),
        parents=tuple(
            (check_name(e.child, "plan member"), check_name(e.parent, "plan member")) for e in msg.parents
        ),
    )
    plan.validate()
    return plan


# --- queries -----------------------------------------------------------------------------------


def envelope_to_proto(envelope: QueryEnvelope) -> pb.QueryEnvelope:
    """QueryEnvelope -> proto."""
    return pb.QueryEnvelope(
        query_id=envelope.query_id,
        querier=envelope.querier,
        created_at=envelope.created_at,
        k=envelope.k,
        sealed_concepts=envelope.sealed_concepts,
        sealed_expression=envelope.sealed_expression,
        sealed_request=envelope.sealed_request,
        sealed_specs=[pb.SealedSpec(aggregator=name, ciphertext=ct) for name, ct in envelope.sealed_specs],
        plan=plan_to_proto(envelope.plan),
        querier_sealing_key=envelope.querier_sealing_key.raw,
        querier_verify_key=envelope.querier_verify_key.raw,
        signature=envelope.signature,
        privacy=pb.Privacy(
            epsilon=envelope.privacy.epsilon,
            delta=envelope.privacy.delta,
            mechanism=envelope.privacy.mechanism,
        ),
        cohort=envelope.cohort,
    )


def envelope_from_proto(msg: pb.QueryEnvelope) -> QueryEnvelope:
    """Proto -> QueryEnvelope (ids, names and key sizes checked; the signature is not)."""
    if not msg.HasField("plan"):
        raise malformed("the query has no aggregator plan")
    return QueryEnvelope(
        query_id=check_query_id(msg.query_id),
        querier=check_name(msg.querier, "querier name"),
        created_at=msg.created_at,
        k=_positive(msg.k, "k"),
        sealed_concepts=msg.sealed_concepts,
        sealed_expression=msg.sealed_expression,
        sealed_request=msg.sealed_request,
        sealed_specs=tuple(
            (check_name(s.aggregator, "aggregator name"), s.ciphertext) for s in msg.sealed_specs
        ),
        plan=plan_from_proto(msg.plan),
        querier_sealing_key=SealingPublicKey(msg.querier_sealing_key),
        querier_verify_key=VerifyKey(msg.querier_verify_key),
        signature=msg.signature,
        privacy=Privacy(msg.privacy.epsilon, msg.privacy.delta, msg.privacy.mechanism),
        cohort=_cohort(msg.cohort),
    )


def found_targets_to_proto(found: FoundTargets) -> pb.FoundTargets:
    """FoundTargets -> proto."""
    return pb.FoundTargets(
        count=found.count,
        sealed_pseudonyms=found.sealed_pseudonyms,
        sealed_attestation=found.sealed_attestation,
    )


def found_targets_from_proto(msg: pb.FoundTargets) -> FoundTargets:
    """Proto -> FoundTargets."""
    return FoundTargets(
        count=_count(msg.count, "target count"),
        sealed_pseudonyms=msg.sealed_pseudonyms,
        sealed_attestation=msg.sealed_attestation,
    )


def query_record_to_proto(record: QueryRecord) -> pb.QueryRecord:
    """QueryRecord -> proto (phases and counts keep their order)."""
    return pb.QueryRecord(
        query_id=record.query_id,
        querier=record.querier,
        created_at=record.created_at,
        state=record.state,
        k=record.k,
        phases=[pb.PhaseTiming(phase=n, seconds=s) for n, s in record.phases.items()],
        counts=[pb.NamedCount(name=n, count=c) for n, c in record.counts.items()],
        sealed_result=record.sealed_result,
        error_code=record.error_code,
        error_message=record.error_message,
    )


def query_record_from_proto(msg: pb.QueryRecord) -> QueryRecord:
    """Proto -> QueryRecord."""
    if msg.state not in QUERY_STATES:
        raise malformed(f"query state is not one of {', '.join(QUERY_STATES)}")
    phases = {p.phase: p.seconds for p in msg.phases}
    counts = {c.name: _count(c.count, "query count") for c in msg.counts}
    if len(phases) != len(msg.phases) or len(counts) != len(msg.counts):
        raise malformed("query record names a phase or count twice")
    return QueryRecord(
        query_id=check_query_id(msg.query_id),
        querier=check_name(msg.querier, "querier name"),
        created_at=msg.created_at,
        state=msg.state,
        k=_positive(msg.k, "k"),
        phases=phases,
        counts=counts,
        sealed_result=msg.sealed_result if msg.HasField("sealed_result") else None,
        error_code=msg.error_code if msg.HasField("error_code") else None,
        error_message=msg.error_message if msg.HasField("error_message") else None,
    )


# --- subscriptions -----------------------------------------------------------------------------


def subscription_item_to_proto(item: SubscriptionItem) -> pb.SubscriptionItem:
    """SubscriptionItem -> proto."""
    return pb.SubscriptionItem(sealed_concepts=item.sealed_concepts, sealed_address=item.sealed_address)


def subscription_item_from_proto(msg: pb.SubscriptionItem) -> SubscriptionItem:
    """Proto -> SubscriptionItem."""
    return SubscriptionItem(sealed_concepts=msg.sealed_concepts, sealed_address=msg.sealed_address)


def batch_header_to_proto(header: BatchHeader) -> pb.BatchHeader:
    """BatchHeader -> proto."""
    return pb.BatchHeader(
        host=header.host,
        op=op_to_proto(header.op),
        issued_at=header.issued_at,
        concept_digests=list(header.concept_digests),
        address_digests=list(header.address_digests),
        signature=header.signature,
    )


def batch_header_from_proto(msg: pb.BatchHeader) -> BatchHeader:
    """Proto -> BatchHeader; digests are 32 bytes and pair up."""
    if len(msg.concept_digests) != len(msg.address_digests):
        raise malformed("subscription batch header: digest lists differ in length")
    if any(len(d) != 32 for d in (*msg.concept_digests, *msg.address_digests)):
        raise malformed("subscription batch header: a digest is not 32 bytes")
    return BatchHeader(
        host=check_name(msg.host, "host name"),
        op=op_from_proto(msg.op),
        issued_at=msg.issued_at,
        concept_digests=tuple(msg.concept_digests),
        address_digests=tuple(msg.address_digests),
        signature=msg.signature,
    )


def subscription_batch_to_proto(batch: SubscriptionBatch) -> pb.SubscriptionBatch:
    """SubscriptionBatch -> proto."""
    return pb.SubscriptionBatch(
        header=batch_header_to_proto(batch.header),
        items=[subscription_item_to_proto(i) for i in batch.items],
    )


def subscription_batch_from_proto(msg: pb.SubscriptionBatch) -> SubscriptionBatch:
    """Proto -> SubscriptionBatch."""
    return SubscriptionBatch(
        header=batch_header_from_proto(msg.header),
        items=tuple(subscription_item_from_proto(i) for i in msg.items),
    )


def signed_items_to_proto(items: SignedItems) -> pb.SignedItems:
    """SignedItems -> proto."""
    return pb.SignedItems(items=list(items.items), signature=items.signature)


def signed_items_from_proto(msg: pb.SignedItems) -> SignedItems:
    """Proto -> SignedItems."""
    return SignedItems(items=tuple(msg.items), signature=msg.signature)


# --- contributions -----------------------------------------------------------------------------


def contribution_request_to_proto(request: ContributionRequest) -> pb.ContributionRequest:
    """ContributionRequest -> proto."""
    return pb.ContributionRequest(
        query_id=request.query_id,
        querier=request.querier,
        request=request.request,
        request_signature=request.request_signature,
        instance_ids=list(request.instance_ids),
        aggregators=list(request.aggregators),
    )


def contribution_request_from_proto(msg: pb.ContributionRequest) -> ContributionRequest:
    """Proto -> ContributionRequest; instance ids and aggregators must pair up."""
    if len(msg.instance_ids) != len(msg.aggregators):
        raise malformed("contribution request: instance ids and aggregators differ in length")
    return ContributionRequest(
        query_id=check_query_id(msg.query_id),
        querier=check_name(msg.querier, "querier name"),
        request=msg.request,
        request_signature=msg.request_signature,
        instance_ids=tuple(msg.instance_ids),
        aggregators=_names(msg.aggregators, "aggregator name"),
    )


def contribution_batch_to_proto(batch: ContributionBatch) -> pb.ContributionBatch:
    """ContributionBatch -> proto."""
    return pb.ContributionBatch(
        aggregators=list(batch.aggregators),
        ciphertexts=list(batch.ciphertexts),
    )


def contribution_batch_from_proto(msg: pb.ContributionBatch) -> ContributionBatch:
    """Proto -> ContributionBatch; aggregators and ciphertexts must pair up."""
    if len(msg.aggregators) != len(msg.ciphertexts):
        raise malformed("contribution batch: aggregators and ciphertexts differ in length")
    return ContributionBatch(
        aggregators=_names(msg.aggregators, "aggregator name"),
        ciphertexts=tuple(msg.ciphertexts),
    )


def collect_report_to_proto(report: CollectReport) -> pb.CollectReport:
    """CollectReport -> proto."""
    return pb.CollectReport(
        targets=report.targets,
        forwarded=report.forwarded,
        unreachable=report.unreachable,
        per_aggregator=[pb.AggregatorCount(aggregator=name, count=n) for name, n in report.per_aggregator],
    )


def collect_report_from_proto(msg: pb.CollectReport) -> CollectReport:
    """Proto -> CollectReport."""
    return CollectReport(
        targets=_count(msg.targets, "targets"),
        forwarded=_count(msg.forwarded, "forwarded"),
        unreachable=_count(msg.unreachable, "unreachable"),
        per_aggregator=tuple(
            (check_name(a.aggregator, "aggregator name"), _count(a.count, "aggregator count"))
            for a in msg.per_aggregator
        ),
    )


# --- Querier payloads (JSON text in the proto) -------------------------------------------------


def spec_to_json(spec: QuerySpec) -> str:
    """QuerySpec -> the canonical JSON of its spec-file form."""
    return dumps(spec.to_obj()).decode()


def spec_from_json(text: str) -> QuerySpec:
    """JSON of a spec-file form -> validated QuerySpec."""
    return parse_query_spec(loads_object(text.encode(), "query spec"))


def result_to_json(result: QueryResult) -> str:
    """QueryResult -> canonical JSON."""
    return dumps(result.to_obj()).decode()


def result_from_json(text: str) -> QueryResult:
    """JSON -> QueryResult."""
    return QueryResult.from_obj(loads_object(text.encode(), "query result"))


def outcome_to_proto(outcome: QueryOutcome) -> querier_pb2.OutcomeResponse:
    """QueryOutcome -> the Querier's Outcome response."""
    return querier_pb2.OutcomeResponse(
        record=query_record_to_proto(outcome.record),
        result_json=None if outcome.result is None else result_to_json(outcome.result),
    )


def outcome_from_proto(msg: querier_pb2.OutcomeResponse) -> QueryOutcome:
    """The Querier's Outcome response -> QueryOutcome."""
    return QueryOutcome(
        record=query_record_from_proto(msg.record),
        result=result_from_json(msg.result_json) if msg.HasField("result_json") else None,
    )
