"""DESIGN.md invariants 1 and 2: plant canaries, then check what every actor obtained in clear."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from dispers.core.ids import Role
from dispers.crypto.observe import recording
from dispers.protocol.querier import run_query
from tests.integration.conftest import World
from tests.integration.world import Canaries, heart_rate_spec


class RecordingPeers:
    """Wraps the Conductor's peers and keeps every argument and answer that passes through C."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.traffic: list[str] = []

    def __getattr__(self, role: str) -> Any:
        getter = getattr(self.inner, role)

        def client(*args: Any) -> Any:
            actor = getter(*args)
            peers = self

            class Proxy:
                def __getattr__(self, method: str) -> Any:
                    fn = getattr(actor, method)

                    def call(*a: Any, **kw: Any) -> Any:
                        peers.traffic.append(repr((a, kw)))
                        out = fn(*a, **kw)
                        peers.traffic.append(repr(out))
                        return out

                    return call

            return Proxy()

        return client


def test_each_actor_sees_only_what_it_may(
    world_factory: Callable[..., World], caplog: pytest.LogCaptureFixture
) -> None:
    canaries = Canaries.fresh()
    world = world_factory(n=300, canaries=canaries)
    relay = None
    if world.transport == "local":
        relay = RecordingPeers(world.actors["conductor"]._peers)
        world.actors["conductor"]._peers = relay
    spec = heart_rate_spec(
        query__target=f"{canaries.concept} OR age:50-100",
        query__k=5,
        data__group_by={"field": "age", "edges": [0, 50, 100]},
    )
    caplog.set_level(logging.DEBUG)
    with recording() as seen:
        world.subscribe()
        outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.result is not None, outcome.record
    young = outcome.result.group("0-50")  # only the canaries are targeted under 50
    assert young.values["count"] == len(canaries.ids)
    assert young.values["mean"] == canaries.value

    roles = {e.name: e.role for e in world.setup.config.roster}
    concept, value, addresses = canaries.concept, canaries.value_text, canaries.addresses
    forbidden: dict[Role, list[str]] = {
        Role.CONDUCTOR: [concept, value, *addresses],
        Role.CONCEPT_INDEXOR: [value, *addresses],
        Role.TARGET_FINDER: [concept, value, *addresses],
        Role.TARGET: [concept, value],
        Role.DATA_AGGREGATOR: [concept, *addresses],
        Role.QUERIER: list(addresses),
    }
    saw: dict[Role, str] = {}
    for item in seen:
        role = roles[item.actor]
        text = item.plaintext.decode("utf-8", "replace")
        saw[role] = saw.get(role, "") + text
        leaked = [c for c in forbidden[role] if c in text]
        assert not leaked, f"{item.actor} obtained {leaked} in {item.what}"
    # Invariant 1: the Conductor opened nothing at all.
    assert Role.CONDUCTOR not in saw
    # The hook works: each actor did see what its job needs.
    assert concept in saw[Role.CONCEPT_INDEXOR]
    assert all(a in saw[Role.TARGET] for a in addresses)
    assert value in saw[Role.DATA_AGGREGATOR]
    assert Role.TARGET_FINDER in saw
    # Nothing reached C in clear, and no log line of any actor carries a canary.
    if relay is not None:
        assert relay.traffic
        assert not [c for c in [concept, value, *addresses] if any(c in t for t in relay.traffic)]
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert not [c for c in [concept, value, *addresses] if c in logs]
    # The Conductor's own record (its store), and what the Querier is shown of it.
    full = world.actors["conductor"].record(outcome.record.query_id)
    for record in (outcome.record, full):
        text = repr(record.counts) + repr(record.phases) + str(record.error_message) + record.querier
        assert not [c for c in [concept, value, *addresses] if c in text]
    assert set(full.counts) <= {"targets", "forwarded", "unreachable", "to:da-1", "to:da-2"}
    assert outcome.record.counts == {}


@pytest.mark.parametrize("transport", ["local"])
def test_conductor_shuffles_subscriptions_before_ci_and_t(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=120)
    host, ci, t = world.actors["pc-1"], world.actors["ci"], world.actors["t"]
    ids = host._store.instance_ids()
    from dispers.core.messages import SubscriptionOp

    batch = host.subscription_batch(SubscriptionOp.SUBSCRIBE, ids)
    items = batch.items
    sent = [i.sealed_concepts for i in items]
    seen: dict[str, list[bytes]] = {}
    for name, actor, method in (("ci", ci, "tokenize_subscriptions"), ("t", t, "pseudonymize")):
        original = getattr(actor, method)

        def spy(caller: str, *args: Any, _o: Any = original, _n: str = name) -> Any:
            seen[_n] = list(args[-1])  # the ciphertexts come last
            return _o(caller, *args)

        setattr(actor, method, spy)

    assert world.actors["conductor"].subscribe("pc-1", batch) == len(items)
    assert sorted(seen["ci"]) == sorted(sent) and seen["ci"] != sent  # same items, another order
    # CI and T get the same permutation (TF must pair them), not the host's order.
    position = {ct: k for k, ct in enumerate(sent)}
    order = [position[ct] for ct in seen["ci"]]
    assert [items[k].sealed_address for k in order] == seen["t"]
