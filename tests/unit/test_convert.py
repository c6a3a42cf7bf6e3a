"""To-proto then from-proto (through the wire bytes) is the identity for every message type."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from dispers.core.config import DAPlan, Roster, RosterEntry
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
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
from dispers.core.spec import (
    HISTOGRAM_STATS,
    MAX_BOUND,
    MAX_BOUND_RATIO,
    MULTI_STATS,
    STATS,
    GroupBy,
    GroupResult,
    QueryResult,
    QuerySpec,
)
from dispers.crypto.keys import SealingPublicKey, VerifyKey
from dispers.proto import common_pb2 as pb
from dispers.protocol.api import QueryOutcome
from dispers.state.queries import QUERY_STATES, QueryRecord
from dispers.transport import convert

MOMENT_STATS = tuple(s for s in STATS if s not in HISTOGRAM_STATS + MULTI_STATS)

T = TypeVar("T")
M = TypeVar("M", bound=Message)

INT64_MAX = 2**63 - 1
names = st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True)
query_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
blobs = st.binary(max_size=64)
sealing_keys = st.binary(min_size=32, max_size=32).map(SealingPublicKey)
verify_keys = st.binary(min_size=32, max_size=32).map(VerifyKey)
counts = st.integers(min_value=0, max_value=INT64_MAX)
finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
ops = st.sampled_from(SubscriptionOp)


def round_trip(value: T, to_proto: Callable[[T], M], from_proto: Callable[[M], T], kind: type[M]) -> T:
    """Convert to proto, serialise, parse the bytes back and convert back."""
    return from_proto(kind.FromString(to_proto(value).SerializeToString()))


@st.composite
def plans(draw: st.DrawFn) -> DAPlan:
    """A valid aggregator tree: each DA's parent was drawn before it."""
    members = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    edges = [(child, draw(st.sampled_from(members[:i]))) for i, child in enumerate(members) if i]
    return DAPlan(members[0], tuple(sorted(edges)))


@st.composite
def rosters(draw: st.DrawFn) -> Roster:
    entries = [
        RosterEntry(
            name=name,
            role=draw(st.sampled_from(Role)),
            endpoint=draw(text),
            sealing_key=draw(sealing_keys),
            verify_key=draw(verify_keys),
            parent=draw(st.none() | names),
        )
        for name in draw(st.lists(names, max_size=8, unique=True))
    ]
    return Roster(tuple(entries))


envelopes = st.builds(
    QueryEnvelope,
    query_id=query_ids,
    querier=names,
    created_at=finite,
    k=st.integers(min_value=1, max_value=INT64_MAX),
    sealed_concepts=blobs,
    sealed_expression=blobs,
    sealed_request=blobs,
    sealed_specs=st.lists(st.tuples(names, blobs), max_size=5).map(tuple),
    plan=plans(),
    querier_sealing_key=sealing_keys,
    querier_verify_key=verify_keys,
    signature=blobs,
)


@st.composite
def contribution_requests(draw: st.DrawFn) -> ContributionRequest:
    pairs = draw(st.lists(st.tuples(text, names), max_size=10))
    return ContributionRequest(
        query_id=draw(query_ids),
        querier=draw(names),
        request=draw(blobs),
        request_signature=draw(blobs),
        instance_ids=tuple(i for i, _ in pairs),
        aggregators=tuple(a for _, a in pairs),
    )


@st.composite
def contribution_batches(draw: st.DrawFn) -> ContributionBatch:
    pairs = draw(st.lists(st.tuples(names, blobs), max_size=10))
    return ContributionBatch(
        aggregators=tuple(a for a, _ in pairs),
        ciphertexts=tuple(c for _, c in pairs),
    )


collect_reports = st.builds(
    CollectReport,
    targets=counts,
    forwarded=counts,
    unreachable=counts,
    per_aggregator=st.lists(st.tuples(names, counts), max_size=5).map(tuple),
)

query_records = st.builds(
    QueryRecord,
    query_id=query_ids,
    querier=names,
    created_at=finite,
    state=st.sampled_from(QUERY_STATES),
    k=st.integers(min_value=1, max_value=INT64_MAX),
    phases=st.dictionaries(text, st.floats(min_value=0, allow_infinity=False), max_size=5),
    counts=st.dictionaries(text, counts, max_size=5),
    sealed_result=st.none() | blobs,
    error_code=st.none() | st.sampled_from([c.value for c in ErrorCode]),
    error_message=st.none() | text,
)

concepts = st.from_regex(r"[a-z]{1,8}:[a-z0-9-]{1,8}", fullmatch=True)
json_values = st.none() | st.booleans() | st.integers() | finite | text
group_bys = st.builds(
    GroupBy,
    field=st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
    edges=st.lists(
        st.floats(min_value=-MAX_BOUND, max_value=MAX_BOUND), min_size=2, max_size=6, unique=True
    ).map(lambda e: tuple(sorted(e))),
)
query_specs = st.builds(
    QuerySpec,
    target=st.lists(concepts, min_size=1, max_size=4).flatmap(
        lambda cs: st.sampled_from([" & ", " | "]).map(lambda op: op.join(cs))
    ),
    function=st.from_regex(r"[a-z_]{1,20}", fullmatch=True),
    params=st.dictionaries(text, json_values, max_size=4),
    as_of=st.dates(min_value=dt.date(1900, 1, 1)),
    group_by=st.none() | group_bys,
    bounds=st.lists(st.floats(min_value=-MAX_BOUND, max_value=MAX_BOUND), min_size=2, max_size=2, unique=True)
    .map(lambda b: (min(b), max(b)))
    .filter(lambda b: max(abs(b[0]), abs(b[1])) <= MAX_BOUND_RATIO * (b[1] - b[0])),
    stats=st.lists(st.sampled_from(MOMENT_STATS), min_size=1, max_size=4, unique=True).map(tuple),
    k=st.integers(min_value=2, max_value=10**6),
)
query_results = st.builds(
    QueryResult,
    query_id=query_ids,
    k=st.integers(min_value=2, max_value=10**6),
    groups=st.lists(
        st.builds(
            GroupResult,
            label=text,
            suppressed=st.booleans(),
            values=st.dictionaries(st.sampled_from(STATS), st.none() | finite),
        ),
        max_size=4,
    ).map(tuple),
    contributions=counts,
    dropped=st.dictionaries(text, st.none() | counts, max_size=3),
    declined=st.none() | counts,
)


@given(ops)
def test_subscription_op(op: SubscriptionOp) -> None:
    assert convert.op_from_proto(convert.op_to_proto(op)) is op


@given(st.sampled_from(Role))
def test_role(role: Role) -> None:
    assert convert.role_from_proto(convert.role_to_proto(role)) is role


@given(rosters())
def test_roster(roster: Roster) -> None:
    assert round_trip(roster, convert.roster_to_proto, convert.roster_from_proto, pb.Roster) == roster


@given(plans())
def test_plan(plan: DAPlan) -> None:
    assert round_trip(plan, convert.plan_to_proto, convert.plan_from_proto, pb.DAPlan) == plan


@given(envelopes)
def test_query_envelope(envelope: QueryEnvelope) -> None:
    back = round_trip(envelope, convert.envelope_to_proto, convert.envelope_from_proto, pb.QueryEnvelope)
    assert back == envelope
    assert back.signing_bytes() == envelope.signing_bytes()


@given(st.builds(SubscriptionItem, sealed_concepts=blobs, sealed_address=blobs))
def test_subscription_item(item: SubscriptionItem) -> None:
    to, back = convert.subscription_item_to_proto, convert.subscription_item_from_proto
    assert round_trip(item, to, back, pb.SubscriptionItem) == item


digests = st.binary(min_size=32, max_size=32)


@st.composite
def batch_headers(draw: st.DrawFn) -> BatchHeader:
    pairs = draw(st.lists(st.tuples(digests, digests), max_size=6))
    return BatchHeader(
        host=draw(names),
        op=draw(ops),
        issued_at=draw(finite),
        concept_digests=tuple(c for c, _ in pairs),
        address_digests=tuple(a for _, a in pairs),
        signature=draw(blobs),
    )


@given(batch_headers())
def test_batch_header(header: BatchHeader) -> None:
    back = round_trip(header, convert.batch_header_to_proto, convert.batch_header_from_proto, pb.BatchHeader)
    assert back == header
    assert back.signing_bytes() == header.signing_bytes() and back.batch_id == header.batch_id


@given(batch_headers(), st.lists(st.builds(SubscriptionItem, sealed_concepts=blobs, sealed_address=blobs)))
def test_subscription_batch(header: BatchHeader, items: list[SubscriptionItem]) -> None:
    batch = SubscriptionBatch(header, tuple(items))
    to, back = convert.subscription_batch_to_proto, convert.subscription_batch_from_proto
    assert round_trip(batch, to, back, pb.SubscriptionBatch) == batch


@given(st.builds(SignedItems, items=st.lists(blobs, max_size=5).map(tuple), signature=blobs))
def test_signed_items(items: SignedItems) -> None:
    to, back = convert.signed_items_to_proto, convert.signed_items_from_proto
    assert round_trip(items, to, back, pb.SignedItems) == items


def test_batch_header_refuses_bad_digests() -> None:
    with pytest.raises(DispersError, match="digest"):
        convert.batch_header_from_proto(
            pb.BatchHeader(host="pc-1", op=1, concept_digests=[b"x"], address_digests=[b"y"])
        )
    with pytest.raises(DispersError, match="differ in length"):
        convert.batch_header_from_proto(pb.BatchHeader(host="pc-1", op=1, concept_digests=[bytes(32)]))


@given(st.builds(FoundTargets, count=counts, sealed_pseudonyms=blobs, sealed_attestation=blobs))
def test_found_targets(found: FoundTargets) -> None:
    to, back = convert.found_targets_to_proto, convert.found_targets_from_proto
    assert round_trip(found, to, back, pb.FoundTargets) == found


@given(contribution_requests())
def test_contribution_request(request: ContributionRequest) -> None:
    to, back = convert.contribution_request_to_proto, convert.contribution_request_from_proto
    assert round_trip(request, to, back, pb.ContributionRequest) == request


@given(contribution_batches())
def test_contribution_batch(batch: ContributionBatch) -> None:
    to, back = convert.contribution_batch_to_proto, convert.contribution_batch_from_proto
    assert round_trip(batch, to, back, pb.ContributionBatch) == batch


@given(collect_reports)
def test_collect_report(report: CollectReport) -> None:
    to, back = convert.collect_report_to_proto, convert.collect_report_from_proto
    assert round_trip(report, to, back, pb.CollectReport) == report


@given(query_records)
def test_query_record(record: QueryRecord) -> None:
    to, back = convert.query_record_to_proto, convert.query_record_from_proto
    result = round_trip(record, to, back, pb.QueryRecord)
    assert result == record
    assert list(result.phases) == list(record.phases)  # phases keep the order they ran in


@given(query_specs)
def test_query_spec_json(spec: QuerySpec) -> None:
    assert convert.spec_from_json(convert.spec_to_json(spec)) == spec


@given(query_results)
def test_query_result_json(result: QueryResult) -> None:
    assert convert.result_from_json(convert.result_to_json(result)) == result


@given(query_records, st.none() | query_results)
def test_query_outcome(record: QueryRecord, result: QueryResult | None) -> None:
    outcome = QueryOutcome(record, result)
    wire = convert.outcome_to_proto(outcome).SerializeToString()
    assert convert.outcome_from_proto(type(convert.outcome_to_proto(outcome)).FromString(wire)) == outcome


# --- from-proto refuses structurally bad messages with MALFORMED --------------------------------


def _valid_envelope() -> pb.QueryEnvelope:
    return pb.QueryEnvelope(
        query_id="ab" * 16,
        querier="researcher",
        k=10,
        plan=pb.DAPlan(root="da-root", parents=[pb.PlanEdge(child="da-1", parent="da-root")]),
        querier_sealing_key=b"\x01" * 32,
        querier_verify_key=b"\x02" * 32,
        privacy=pb.Privacy(epsilon=1.0, delta=0.0, mechanism="laplace"),
    )


def _tweak(**fields: Any) -> pb.QueryEnvelope:
    msg = _valid_envelope()
    for name, value in fields.items():
        if name in ("plan", "privacy"):
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "msg",
    [
        _tweak(query_id="not-hex"),
        _tweak(querier="Bad Name"),
        _tweak(k=0),
        _tweak(querier_sealing_key=b"\x01" * 31),
        _tweak(querier_verify_key=b""),
        _tweak(plan=pb.DAPlan(root="a", parents=[pb.PlanEdge(child="b", parent="c")])),
        _tweak(plan=pb.DAPlan(root="a", parents=[pb.PlanEdge(child="a", parent="a")])),
        _tweak(privacy=pb.Privacy()),  # no privacy parameters: epsilon 0
        _tweak(privacy=pb.Privacy(epsilon=1.0, mechanism="gaussian")),  # gaussian needs delta > 0
    ],
)
def test_bad_envelope_is_malformed(msg: pb.QueryEnvelope) -> None:
    convert.envelope_from_proto(_valid_envelope())  # the baseline is fine
    with pytest.raises(DispersError) as info:
        convert.envelope_from_proto(msg)
    assert info.value.code is ErrorCode.MALFORMED


def test_envelope_without_plan_is_malformed() -> None:
    msg = _valid_envelope()
    msg.ClearField("plan")
    with pytest.raises(DispersError, match="plan"):
        convert.envelope_from_proto(msg)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: convert.op_from_proto(pb.SUBSCRIPTION_OP_UNSPECIFIED),
        lambda: convert.op_from_proto(99),
        lambda: convert.role_from_proto(pb.ROLE_UNSPECIFIED),
        lambda: convert.contribution_batch_from_proto(pb.ContributionBatch(aggregators=["da-1"])),
        lambda: convert.contribution_request_from_proto(
            pb.ContributionRequest(query_id="ab" * 16, querier="q", instance_ids=["x"])
        ),
        lambda: convert.found_targets_from_proto(pb.FoundTargets(count=-1)),
        lambda: convert.query_record_from_proto(
            pb.QueryRecord(query_id="ab" * 16, querier="q", state="sleeping", k=10)
        ),
        lambda: convert.roster_from_proto(pb.Roster(entries=[_entry("same"), _entry("same")])),
        lambda: convert.spec_from_json("[1, 2]"),
        lambda: convert.spec_from_json('{"query": {}}'),
    ],
)
def test_bad_messages_are_malformed(bad: Callable[[], object]) -> None:
    with pytest.raises(DispersError) as info:
        bad()
    assert info.value.code is ErrorCode.MALFORMED


def _entry(name: str) -> pb.RosterEntry:
    return pb.RosterEntry(
        name=name,
        role=pb.ROLE_TARGET,
        endpoint="127.0.0.1:1",
        sealing_key=b"\x01" * 32,
        verify_key=b"\x02" * 32,
    )


def test_a_two_field_group_by_by_category_round_trips() -> None:
    """The spec-file form (Querier service) and the data request (signed by Q, read by hosts)
    both carry a second field and categories by name."""
    import datetime as dt

    from dispers.core.spec import DataRequest, parse_query_spec

    spec = parse_query_spec(
        {
            "query": {"target": "age:25-50"},
            "data": {
                "function": "mean_heart_rate",
                "group_by": {
                    "field": "age",
                    "edges": [12, 25, 50],
                    "then": {"field": "sex", "categories": ["M", "F"]},
                },
            },
            "aggregate": {"bounds": [30, 220]},
        }
    )
    assert convert.spec_from_json(convert.spec_to_json(spec)) == spec
    request = DataRequest(
        "ab" * 16, "mean_heart_rate", {}, dt.date(2026, 1, 1), spec.group_by, ("da-1",), 0.0
    )
    back = DataRequest.from_obj(json.loads(json.dumps(request.to_obj())))
    assert back.group_by == spec.group_by and back.group_by is not None and back.group_by.then is not None
    assert back.group_by.then.edges == (0.0, 1.0, 2.0) and spec.groups[1] == "12-25 & M"
