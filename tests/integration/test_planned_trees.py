"""Aggregator trees planned per query from the roster and the spec ([plan]): any depth and
fan-out, the same exact numbers as numpy, the shape reported in the result."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.querier import run_query
from dispers.simulation.ground_truth import mean_heart_rate_by_age
from tests.integration.conftest import World
from tests.integration.world import AS_OF, heart_rate_spec

EDGES = [12, 25, 50, 100]


def test_a_deeper_tree_planned_from_the_spec_gives_the_exact_numbers(
    world_factory: Callable[..., World],
) -> None:
    """Seven DAs besides the root; [plan] asks 4 leaves with fan_out 2: leaves under two inner
    DAs under the root, three layers. Every statistic equals numpy's, and the result says so."""
    world = world_factory(n=500, aggregators=7)
    world.subscribe()
    spec = heart_rate_spec(plan={"leaves": 4, "fan_out": 2})
    outcome = run_query(world.querier, spec, timeout_s=120)
    result = outcome.result
    assert result is not None, outcome.record
    assert result.plan == {"root": "da-root", "depth": 3, "leaves": 4, "aggregators": 7, "fan_out": 2}
    truth = mean_heart_rate_by_age(
        world.setup.population, edges=EDGES, window_days=30, as_of=AS_OF, bounds=(30, 220)
    )
    for label, t in truth.items():
        g = result.group(label)
        assert g.values["count"] == t.count
        for stat in ("sum", "mean", "std", "min", "max"):
            assert math.isclose(g.values[stat], getattr(t, stat), rel_tol=1e-9), (label, stat)  # type: ignore[arg-type]
    counts = world.actors["conductor"].record(outcome.record.query_id).counts
    used = {k for k, v in counts.items() if k.startswith("to:") and v > 0}
    assert len(used) == 4  # items went to the four planned leaves only
    assert all(da.active_queries == 0 for da in world.das.values())


@pytest.mark.parametrize("transport", ["local"])
def test_leaves_from_expected_targets_and_a_cap_per_leaf(world_factory: Callable[..., World]) -> None:
    """max_per_leaf 150 for 500 expected targets: 4 leaves; with fan_out 8 they hang from the
    root (two layers). The plan follows the spec, not the real number of targets."""
    world = world_factory(n=300, aggregators=5)
    world.subscribe()
    spec = heart_rate_spec(plan={"max_per_leaf": 150, "expected_targets": 500})
    result = run_query(world.querier, spec, timeout_s=120).result
    assert result is not None
    assert result.plan == {"root": "da-root", "depth": 2, "leaves": 4, "aggregators": 5, "fan_out": 4}


@pytest.mark.parametrize("transport", ["local"])
@pytest.mark.parametrize(
    ("plan", "named"),
    [
        ({"leaves": 6, "fan_out": 2}, "need 11 aggregators besides the root, and the roster has 3"),
        ({"leaves": 2, "max_per_leaf": 10}, "exactly one of leaves and max_per_leaf"),
        ({"max_per_leaf": 10}, "plan.max_per_leaf goes with plan.expected_targets"),
        ({"leaves": 0}, "plan.leaves must be a positive integer"),
        ({"leaves": 2, "fan_out": 1}, "plan.fan_out must be at least 2"),
        ({"leaves": 2, "depth": 3}, "unknown key plan.depth"),
    ],
)
def test_impossible_or_malformed_plans_are_refused_before_anyone_is_contacted(
    world_factory: Callable[..., World], plan: dict[str, int], named: str
) -> None:
    world = world_factory(n=40, aggregators=3)
    with pytest.raises(DispersError) as info:
        world.querier.submit(heart_rate_spec(plan=plan))
    assert info.value.code is ErrorCode.MALFORMED and named in info.value.message, info.value.message
    assert world.actors["conductor"]._store.list_ids() == []


@pytest.mark.parametrize("transport", ["local"])
def test_a_plan_rooted_elsewhere_or_naming_a_non_aggregator_is_refused_by_the_das(
    world_factory: Callable[..., World],
) -> None:
    """The plan is the querier's, signed; a DA still refuses one not rooted at the cluster's
    root (which holds the budget ledger) or naming an actor that is not an aggregator."""
    import dataclasses

    from dispers.core.config import DAPlan
    from dispers.protocol.querier import _with_signature

    world = world_factory(n=40, aggregators=3)
    querier = world.actors["researcher"]
    for plan in (
        DAPlan("da-1", (("da-2", "da-1"), ("da-root", "da-1"))),
        DAPlan("da-root", (("ci", "da-root"),)),
    ):
        envelope = querier.build(heart_rate_spec())
        forged = dataclasses.replace(envelope, plan=plan)
        forged = _with_signature(forged, querier._keys.signing.sign(forged.signing_bytes()))
        with pytest.raises(DispersError) as info:
            world.das["da-root"].prepare("conductor", forged)
        assert info.value.code is ErrorCode.MALFORMED, info.value
