"""DESIGN.md invariant 6 through the real gRPC services: a clear status, the server keeps
serving, and no state is left half-written."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispers.core.codec import dumps
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.messages import QueryEnvelope, SubscriptionBatch, SubscriptionItem, SubscriptionOp
from dispers.core.wire import ContributionLayout
from dispers.crypto import Opener
from dispers.proto import conductor_pb2, data_aggregator_pb2, target_finder_pb2
from dispers.protocol.common import seal_padded
from dispers.protocol.querier import run_query
from dispers.transport import convert
from tests.integration.conftest import World, grpc_world
from tests.integration.world import AS_OF, heart_rate_spec, make_setup


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = grpc_world(make_setup(Path(tmp_path_factory.mktemp("bad")), n=300))
    w.subscribe()
    yield w
    w.close()


# Who legitimately calls each role: raw calls use that caller's certificate, so a refusal is
# about the bytes sent, not about who sent them.
_CALLER_OF = {
    Role.CONDUCTOR: "researcher",
    Role.CONCEPT_INDEXOR: "conductor",
    Role.TARGET_FINDER: "conductor",
    Role.TARGET: "conductor",
    Role.DATA_AGGREGATOR: "t",
    Role.PERSONAL_CLOUD: "t",
    Role.QUERIER: "researcher",
}


def _channel(world: World, actor: str, caller: str | None = None) -> grpc.Channel:
    """A channel to `actor` as its usual caller would open it (mutual TLS unless insecure)."""
    from dispers.transport.grpc_client import open_channel

    config = world.setup.config
    entry = config.roster.get(actor)
    caller = caller or _CALLER_OF[entry.role]
    return open_channel(
        entry.endpoint, identity=config.tls_identity(caller), server_name=actor, caller=caller
    )


def raw_call(
    world: World, actor: str, method: str, request: bytes, caller: str | None = None
) -> tuple[grpc.StatusCode, str]:
    """Call a method with raw bytes, as a hostile or broken client would."""
    entry = world.setup.config.roster.get(actor)
    service = {
        Role.CONDUCTOR: "Conductor",
        Role.CONCEPT_INDEXOR: "ConceptIndexor",
        Role.TARGET_FINDER: "TargetFinder",
        Role.TARGET: "Target",
        Role.DATA_AGGREGATOR: "DataAggregator",
        Role.PERSONAL_CLOUD: "PersonalCloud",
        Role.QUERIER: "Querier",
    }[entry.role]
    if caller is None and (actor, method) == ("conductor", "Subscribe"):
        caller = "pc-1"  # only a host subscribes
    with _channel(world, actor, caller) as channel:
        call = channel.unary_unary(f"/dispers.proto.{service}/{method}")
        try:
            call(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), str(exc.details())
        return grpc.StatusCode.OK, ""


def state(world: World) -> dict[str, Any]:
    """Every store a bad request could leave half-written."""
    return {
        "memberships": {t: len(world.actors["tf"]._sets.members(t)) for t in tokens(world)},
        "universe": len(world.actors["tf"]._sets.universe()),
        "concepts": len(world.actors["ci"]._catalog),
        "directory": len(world.actors["t"]._directory),
        "staged": (len(world.actors["ci"]._staged), len(world.actors["t"]._staged)),
        "queries": world.actors["conductor"]._store.list_ids(),
        "da_state": [da.active_queries for da in world.das.values()],
    }


def tokens(world: World) -> list[bytes]:
    ci = world.actors["ci"]
    return [ci.token(c) for c in ("age:12-25", "age:25-50", "age:50-100", "sex:F", "sex:M")]


def still_serving(world: World) -> None:
    """The cluster answers the next, valid, request: the whole heart-rate query."""
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    assert outcome.result is not None and outcome.result.contributions > 0


def items(world: World, n: int = 5) -> list[SubscriptionItem]:
    """Genuine subscription items of the host's first n instances (already subscribed)."""
    host = world.actors["pc-1"]
    return list(host.subscription_batch(SubscriptionOp.SUBSCRIBE, host._store.instance_ids()[:n]).items)


def signed_batch(world: World, batch: list[SubscriptionItem], host: str = "pc-1") -> SubscriptionBatch:
    """A batch of these items signed by the host, as the host would send it."""
    unsigned = SubscriptionBatch.build(host, SubscriptionOp.SUBSCRIBE, time.time(), tuple(batch))
    signature = world.setup.keys(host).signing.sign(unsigned.header.signing_bytes())
    return SubscriptionBatch(dataclasses.replace(unsigned.header, signature=signature), unsigned.items)


@pytest.mark.parametrize(
    "actor,method",
    [
        ("conductor", "Subscribe"),
        ("conductor", "Submit"),
        ("ci", "TokenizeSubscriptions"),
        ("tf", "FindTargets"),
        ("t", "Collect"),
        ("da-1", "Ingest"),
        ("pc-1", "Contribute"),
        ("researcher", "Submit"),
    ],
)
def test_malformed_message_is_invalid_argument(world: World, actor: str, method: str) -> None:
    before = state(world)
    code, details = raw_call(world, actor, method, b"\x0a\xff\xff\xff\xff\x0fnot protobuf")
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"MALFORMED: {method}: request is not valid protobuf"
    assert state(world) == before


def test_well_formed_message_with_bad_fields_is_invalid_argument(world: World) -> None:
    envelope = world.querier_object.build(heart_rate_spec())
    msg = convert.envelope_to_proto(envelope)
    msg.query_id = "not-a-query-id"
    before = state(world)
    code, details = raw_call(
        world, "conductor", "Submit", conductor_pb2.ConductorSubmitRequest(envelope=msg).SerializeToString()
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "query id must be 32 lowercase hex digits" in details
    assert state(world) == before
    still_serving(world)


def _subscribe_raw(world: World, batch: list[SubscriptionItem]) -> tuple[grpc.StatusCode, str]:
    request = conductor_pb2.SubscribeRequest(
        batch=convert.subscription_batch_to_proto(signed_batch(world, batch))
    )
    return raw_call(world, "conductor", "Subscribe", request.SerializeToString())


def _fresh_item(world: World, concept: str = "sex:F", address: str = "pc-1/brand-new") -> SubscriptionItem:
    roster, settings = world.setup.config.roster, world.setup.config.settings
    nonce = secrets.token_hex(16)
    return SubscriptionItem(
        sealed_concepts=seal_padded(
            roster.one(Role.CONCEPT_INDEXOR).sealing_key, {"concepts": [concept], "nonce": nonce},
            settings.concepts_bytes, "concepts",
        ),
        sealed_address=seal_padded(
            roster.one(Role.TARGET).sealing_key, {"address": address, "nonce": nonce},
            settings.address_bytes, "address",
        ),
    )  # fmt: skip


@pytest.mark.parametrize("field", ["sealed_concepts", "sealed_address"])
def test_tampered_ciphertext_refuses_the_whole_batch(world: World, field: str) -> None:
    batch = [*items(world, 4), _fresh_item(world)]
    bad = bytearray(getattr(batch[2], field))
    bad[60] ^= 0x01
    batch[2] = dataclasses.replace(batch[2], **{field: bytes(bad)})
    before = state(world)
    code, details = _subscribe_raw(world, batch)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("BAD_CIPHERTEXT: subscription 2 ")  # the caller's own position
    assert "tampered, truncated or sealed to another actor" in details
    # The fresh concept and address of item 4 reached neither the catalogue nor the directory.
    assert state(world) == before
    still_serving(world)


def test_ciphertext_sealed_to_another_actor(world: World) -> None:
    settings = world.setup.config.settings
    ci_key = world.setup.config.roster.one(Role.CONCEPT_INDEXOR).sealing_key
    body = {"address": "pc-1/other-new", "nonce": secrets.token_hex(16)}
    wrong = dataclasses.replace(  # the right length, sealed to CI instead of T
        _fresh_item(world, address="pc-1/other-new"),
        sealed_address=seal_padded(ci_key, body, settings.address_bytes, "address"),
    )
    before = state(world)
    code, details = _subscribe_raw(world, [_fresh_item(world), wrong])
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("BAD_CIPHERTEXT: subscription 1 address")
    assert "t's key" in details
    assert state(world) == before


def test_truncated_ciphertext(world: World) -> None:
    item = _fresh_item(world)
    before = state(world)
    code, details = _subscribe_raw(
        world, [dataclasses.replace(item, sealed_concepts=item.sealed_concepts[:20])]
    )
    # Refused by the Conductor on its public length alone, before anyone tries to open it.
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "MALFORMED: a subscription item does not have the cluster's fixed length"
    assert state(world) == before


def test_unknown_concept_is_refused_before_anything_is_sealed(world: World) -> None:
    before = state(world)
    spec = heart_rate_spec(query__target="age:25-50 AND cohort:nobody-has-this")
    with pytest.raises(DispersError) as info:
        world.querier.submit(spec)
    assert info.value.code is ErrorCode.UNKNOWN_CONCEPT
    assert "not in the cluster's vocabulary" in info.value.message
    assert state(world) == before  # nothing reached the Conductor
    # A hand-sealed query naming it anyway: CI refuses it by position, never by name.
    envelope = world.querier_object.build(heart_rate_spec())
    ci_key = world.setup.config.roster.one(Role.CONCEPT_INDEXOR).sealing_key
    sealed = seal_padded(
        ci_key, {"query_id": envelope.query_id, "concepts": ["cohort:nobody-has-this"]},
        world.setup.config.settings.concepts_bytes, "concepts",
    )  # fmt: skip
    with pytest.raises(DispersError) as info:
        world.peers.concept_indexor().tokenize_query(_resigned(world, envelope, sealed_concepts=sealed))
    assert info.value.code is ErrorCode.UNKNOWN_CONCEPT and "nobody" not in info.value.message
    still_serving(world)


def test_vocabulary_concepts_nobody_holds_are_tokenized_like_any_other(world: World) -> None:
    """No error tells anyone whether a concept is populated: an empty one gives an empty target."""
    outcome = run_query(world.querier, heart_rate_spec(query__target="age:100-150"), timeout_s=60)
    assert outcome.record.state == "refused" and outcome.record.error_code == "TOO_FEW_TARGETS"


def _resigned(world: World, envelope: QueryEnvelope, **changes: Any) -> QueryEnvelope:
    keys = world.setup.keys("researcher")
    unsigned = dataclasses.replace(envelope, **changes)
    return dataclasses.replace(unsigned, signature=keys.signing.sign(unsigned.signing_bytes()))


def _bad_expression_envelope(world: World) -> QueryEnvelope:
    envelope = world.querier_object.build(heart_rate_spec())
    tf_key = world.setup.config.roster.one(Role.TARGET_FINDER).sealing_key
    sealed = seal_padded(
        tf_key, {"query_id": envelope.query_id, "expression": "(#0 | #1"},
        world.setup.config.settings.expression_bytes, "expression",
    )  # fmt: skip
    return _resigned(world, envelope, sealed_expression=sealed)


def test_expression_that_does_not_parse(world: World) -> None:
    before = state(world)
    query_id = world.peers_as("researcher").conductor().submit(_bad_expression_envelope(world))
    record = world.peers_as("researcher").conductor().status(query_id, wait_s=60)
    assert record.state == "failed"
    assert record.error_code == "INVALID_EXPRESSION"
    assert record.error_message == "the target expression does not parse (unclosed parenthesis at 0)"
    assert state(world)["da_state"] == before["da_state"]
    # Straight to TF over gRPC: INVALID_ARGUMENT.
    direct = _bad_expression_envelope(world)
    sealed_tokens = world.peers.concept_indexor().tokenize_query(direct)
    request = target_finder_pb2.FindTargetsRequest(
        envelope=convert.envelope_to_proto(direct), sealed_tokens=sealed_tokens
    )
    code, details = raw_call(world, "tf", "FindTargets", request.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("INVALID_EXPRESSION: the target expression does not parse")
    still_serving(world)


def test_tampered_signature_and_replay(world: World) -> None:
    envelope = world.querier_object.build(heart_rate_spec())
    forged = dataclasses.replace(envelope, k=envelope.k + 1)  # signature no longer matches
    msg = conductor_pb2.ConductorSubmitRequest(envelope=convert.envelope_to_proto(forged))
    code, details = raw_call(world, "conductor", "Submit", msg.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "BAD_SIGNATURE: query: signature does not verify"
    conductor = world.peers_as("researcher").conductor()
    query_id = conductor.submit(envelope)
    assert conductor.status(query_id, wait_s=60).state == "done"
    msg = conductor_pb2.ConductorSubmitRequest(envelope=convert.envelope_to_proto(envelope))
    code, details = raw_call(world, "conductor", "Submit", msg.SerializeToString())
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert details.startswith("REPLAY")


def test_contribution_outside_bounds_is_dropped_and_reported(world: World) -> None:
    # Bounds that the population's values straddle: the DAs drop and count what falls outside.
    spec = heart_rate_spec(aggregate__bounds=[30, 70])
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.result is not None
    truth_in = sum(1 for g in outcome.result.groups for _ in [g] if not g.suppressed)
    assert truth_in > 0
    dropped = dict(outcome.result.dropped)
    assert dropped["out_of_bounds"] is not None and dropped["out_of_bounds"] >= outcome.result.k
    record = world.actors["conductor"].record(outcome.record.query_id)
    declined = outcome.result.declined or 0
    assert record.counts["targets"] == outcome.result.contributions + dropped["out_of_bounds"] + declined
    for g in outcome.result.groups:
        assert g.values["max"] is not None and g.values["max"] <= 70
    still_serving(world)


def test_an_aggregator_that_is_down_fails_the_query_cleanly(tmp_path: Path) -> None:
    w = grpc_world(make_setup(tmp_path / "down", n=200))
    try:
        w.subscribe()
        next(s for s in w.servers if s.name == "da-2").stop(0)
        outcome = run_query(w.querier, heart_rate_spec(), timeout_s=60)
        assert outcome.record.state == "failed"
        assert outcome.record.error_code == "UNAVAILABLE"
        assert "da-2" in str(outcome.record.error_message)
        # The aggregators still up forgot the query; the Conductor serves the next request.
        assert all(da.active_queries == 0 for name, da in w.das.items() if name != "da-2")
        assert w.peers_as("researcher").conductor().get_roster() == w.setup.config.roster
    finally:
        w.close()


def test_roster_served_by_the_conductor_carries_public_keys_only(world: World) -> None:
    with _channel(world, "conductor") as channel:
        raw = channel.unary_unary("/dispers.proto.Conductor/GetRoster")(b"", timeout=30)
    response = conductor_pb2.GetRosterResponse.FromString(raw)
    assert convert.roster_from_proto(response.roster) == world.setup.config.roster
    for actor in world.setup.config.roster:
        keys = world.setup.keys(actor.name)
        assert keys.sealing.public.raw in raw and keys.signing.verify_key.raw in raw
        for secret in (keys.sealing.private_bytes(), keys.signing.seed(), keys.secret):
            assert secret not in raw
    assert b".key" not in raw and b"state/" not in raw  # no key file or store paths either


def _contribution_request(world: World, *, issued_at: float, ids: list[str]) -> bytes:
    import time

    from dispers.core.ids import new_query_id
    from dispers.core.messages import ContributionRequest, request_signing_bytes
    from dispers.core.spec import DataRequest, GroupBy
    from dispers.proto import personal_cloud_pb2

    keys = world.setup.keys("researcher")
    request = DataRequest(
        query_id=new_query_id(),
        function="mean_heart_rate",
        params={"window_days": 30},
        as_of=AS_OF,
        group_by=GroupBy("age", (0.0, 150.0)),
        aggregators=("da-1", "da-2"),
        issued_at=time.time() + issued_at,
    )
    raw = dumps(request.to_obj())
    msg = ContributionRequest(
        query_id=request.query_id,
        querier="researcher",
        request=raw,
        request_signature=keys.signing.sign(request_signing_bytes(raw)),
        instance_ids=tuple(ids),
        aggregators=tuple("da-1" for _ in ids),
    )
    return personal_cloud_pb2.ContributeRequest(
        request=convert.contribution_request_to_proto(msg)
    ).SerializeToString()


def test_host_refuses_stale_requests_and_answers_each_instance_once(world: World) -> None:
    from dispers.proto import personal_cloud_pb2

    ids = world.actors["pc-1"]._store.instance_ids()[:40]
    code, details = raw_call(
        world, "pc-1", "Contribute", _contribution_request(world, issued_at=-3600, ids=ids)
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert details == "EXPIRED: the data request is stale or dated in the future"
    fresh = _contribution_request(world, issued_at=0, ids=ids)
    with _channel(world, "pc-1") as channel:
        call = channel.unary_unary("/dispers.proto.PersonalCloud/Contribute")
        first = personal_cloud_pb2.ContributeResponse.FromString(call(fresh, timeout=30))
        again = personal_cloud_pb2.ContributeResponse.FromString(call(fresh, timeout=30))
    # Exactly one item per instance asked, each time; only DA-1 (the test opens as it) can tell.
    assert len(first.batch.ciphertexts) == len(again.batch.ciphertexts) == 40
    assert len({len(c) for c in [*first.batch.ciphertexts, *again.batch.ciphertexts]}) == 1
    opener = Opener("da-1", world.setup.keys("da-1").sealing)
    layout = ContributionLayout(1)

    def contributions(batch: Any) -> int:
        return sum(not layout.decode(opener.open(c, "item")).declined for c in batch.ciphertexts)

    assert 0 < contributions(first.batch) <= 40
    assert contributions(again.batch) == 0  # T cannot replay a request to have values sealed twice


def test_an_oversized_request_is_refused_before_it_is_read(world: World) -> None:
    """Every RPC caps what it accepts: a DA's cap follows the cluster's batch size."""
    from dispers.services.server import max_request_bytes

    cap = max_request_bytes(Role.DATA_AGGREGATOR, world.setup.config.settings)
    request = data_aggregator_pb2.IngestRequest(query_id="0" * 32, ciphertexts=[bytes(cap)])
    before = state(world)
    code, _ = raw_call(world, "da-1", "Ingest", request.SerializeToString())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert state(world) == before
    still_serving(world)


def test_query_parts_of_the_wrong_length_are_refused_unopened(world: World) -> None:
    """A sealed part longer than the cluster's fixed frame is refused before anyone opens it."""
    envelope = world.querier_object.build(heart_rate_spec())
    longer = _resigned(world, envelope, sealed_expression=envelope.sealed_expression + b"\x00")
    with pytest.raises(DispersError) as info:
        world.peers_as("researcher").conductor().submit(longer)
    assert info.value.code is ErrorCode.MALFORMED and "fixed length" in info.value.message
