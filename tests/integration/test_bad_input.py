"""DESIGN.md invariant 6 through the real gRPC services: a clear status, the server keeps
serving, and no state is left half-written."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispers.core.codec import dumps
from dispers.core.ids import Role
from dispers.core.messages import QueryEnvelope, SubscriptionItem, SubscriptionOp
from dispers.crypto import seal
from dispers.proto import conductor_pb2, target_finder_pb2
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


def _channel(world: World, actor: str) -> grpc.Channel:
    """A channel to `actor` as its usual caller would open it (mutual TLS unless insecure)."""
    from dispers.transport.grpc_client import open_channel

    config = world.setup.config
    entry = config.roster.get(actor)
    caller = _CALLER_OF[entry.role]
    return open_channel(
        entry.endpoint, identity=config.tls_identity(caller), server_name=actor, caller=caller
    )


def raw_call(world: World, actor: str, method: str, request: bytes) -> tuple[grpc.StatusCode, str]:
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
    with _channel(world, actor) as channel:
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
    return [ci.token(c) for c in ("age:12-25", "age:25-50", "age:50-100", "sex:F", "cohort:fresh")]


def still_serving(world: World) -> None:
    """The cluster answers the next, valid, request: the whole heart-rate query."""
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    assert outcome.result is not None and outcome.result.contributions > 0


def items(world: World, n: int = 5) -> list[SubscriptionItem]:
    """Genuine subscription items of the host's first n instances (already subscribed)."""
    host = world.actors["pc-1"]
    return host.subscription_items(host._store.instance_ids()[:n])


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
        op=convert.op_to_proto(SubscriptionOp.SUBSCRIBE),
        items=[convert.subscription_item_to_proto(i) for i in batch],
    )
    return raw_call(world, "conductor", "Subscribe", request.SerializeToString())


def _fresh_item(
    world: World, concept: str = "cohort:fresh", address: str = "pc-1/brand-new"
) -> SubscriptionItem:
    roster = world.setup.config.roster
    return SubscriptionItem(
        sealed_concepts=seal(roster.one(Role.CONCEPT_INDEXOR).sealing_key, dumps([concept])),
        sealed_address=seal(roster.one(Role.TARGET).sealing_key, address.encode()),
    )


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
    roster = world.setup.config.roster
    wrong = dataclasses.replace(
        _fresh_item(world, address="pc-1/other-new"),
        sealed_address=seal(roster.one(Role.CONCEPT_INDEXOR).sealing_key, b"pc-1/other-new"),
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
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in details
    assert state(world) == before


def test_unknown_concept(world: World) -> None:
    before = state(world)
    spec = heart_rate_spec(query__target="age:25-50 AND cohort:nobody-has-this")
    outcome = run_query(world.querier, spec, timeout_s=60)
    assert outcome.record.state == "failed"
    assert outcome.record.error_code == "UNKNOWN_CONCEPT"
    assert outcome.record.error_message == (
        "the concept(s) at position(s) 1 of the query are unknown to the Concept Indexor"
    )
    after = state(world)
    assert after["queries"] == [*before["queries"], outcome.record.query_id]
    assert {k: v for k, v in after.items() if k != "queries"} == {
        k: v for k, v in before.items() if k != "queries"
    }
    # Directly at CI, the status is INVALID_ARGUMENT with the same message.
    envelope = world.querier_object.build(spec)
    with pytest.raises(Exception) as info:
        world.peers.concept_indexor().tokenize_query(envelope)
    assert "UNKNOWN_CONCEPT" in str(info.value) and "nobody" not in str(info.value)
    still_serving(world)


def _resigned(world: World, envelope: QueryEnvelope, **changes: Any) -> QueryEnvelope:
    keys = world.setup.keys("researcher")
    unsigned = dataclasses.replace(envelope, **changes)
    return dataclasses.replace(unsigned, signature=keys.signing.sign(unsigned.signing_bytes()))


def _bad_expression_envelope(world: World) -> QueryEnvelope:
    envelope = world.querier_object.build(heart_rate_spec())
    tf_key = world.setup.config.roster.one(Role.TARGET_FINDER).sealing_key
    sealed = seal(tf_key, dumps({"query_id": envelope.query_id, "expression": "(#0 | #1"}))
    return _resigned(world, envelope, sealed_expression=sealed)


def test_expression_that_does_not_parse(world: World) -> None:
    before = state(world)
    query_id = world.peers.conductor().submit(_bad_expression_envelope(world))
    record = world.peers.conductor().status(query_id, wait_s=60)
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
    conductor = world.peers.conductor()
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
    assert set(dropped) == {"out_of_bounds"} and dropped["out_of_bounds"] > 0
    assert outcome.record.counts["contributed"] == outcome.result.contributions + dropped["out_of_bounds"]
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
        assert w.peers.conductor().get_roster() == w.setup.config.roster
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
    answered = len(first.batch.ciphertexts)
    assert 0 < answered <= 40 and first.batch.declined == 40 - answered
    assert len(again.batch.ciphertexts) == 0 and again.batch.declined == 40  # T cannot replay it
