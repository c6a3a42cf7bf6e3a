"""The heart-rate query end to end: numbers against ground truth, k, suppression, forgetting."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from dispers.protocol.querier import run_query
from dispers.simulation.ground_truth import mean_heart_rate_by_age
from tests.integration.conftest import BUILDERS, World
from tests.integration.world import AS_OF, heart_rate_spec, make_setup

EDGES = [12, 25, 50, 100]


def assert_matches_truth(world: World, result_groups: dict[str, dict[str, float | None]]) -> None:
    truth = mean_heart_rate_by_age(
        world.setup.population, edges=EDGES, window_days=30, as_of=AS_OF, bounds=(30, 220)
    )
    assert set(result_groups) == set(truth)
    for label, t in truth.items():
        got = result_groups[label]
        assert got["count"] == t.count
        for stat in ("sum", "mean", "var", "std", "min", "max"):
            value = got[stat]
            assert value is not None
            assert math.isclose(value, getattr(t, stat), rel_tol=1e-9, abs_tol=1e-9), (label, stat)


def test_heart_rate_query_equals_ground_truth(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=600)
    assert world.subscribe() == 600
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    result = outcome.result
    assert result is not None
    assert all(not g.suppressed for g in result.groups)
    assert_matches_truth(world, {g.label: dict(g.values) for g in result.groups})
    # The Querier sees no count of the Conductor's: beside the released counts, the number of
    # targets would give a suppressed group's size away.
    assert outcome.record.counts == {}
    counts = world.actors["conductor"].record(outcome.record.query_id).counts
    # Every target answered exactly one item, contribution or decline: T cannot tell them apart.
    assert counts["forwarded"] == counts["targets"] and counts["unreachable"] == 0
    assert "contributed" not in counts and "declined" not in counts
    assert counts["to:da-1"] + counts["to:da-2"] == counts["forwarded"]
    assert min(counts["to:da-1"], counts["to:da-2"]) > 0  # both leaves got work
    truth = mean_heart_rate_by_age(
        world.setup.population, edges=EDGES, window_days=30, as_of=AS_OF, bounds=(30, 220)
    )
    assert result.contributions == sum(t.count for t in truth.values())
    assert result.declined == counts["targets"] - result.contributions  # only Q learns it
    assert outcome.record.phases == {}  # the querier sees no timing either (collect grows with targets)
    full = world.actors["conductor"].record(outcome.record.query_id)
    assert set(full.phases) == {"tokens", "targets", "prepare", "collect", "aggregate"}
    # Invariant 3: every DA forgot the query once it was done.
    assert all(da.active_queries == 0 for da in world.das.values())


def test_in_process_and_grpc_give_the_same_numbers(tmp_path: Path) -> None:
    results = {}
    for transport, build in BUILDERS.items():
        world = build(make_setup(tmp_path / transport, n=500, seed=3))
        try:
            world.subscribe()
            outcome = run_query(world.querier, heart_rate_spec(), timeout_s=120)
            assert outcome.result is not None
            results[transport] = {g.label: dict(g.values) for g in outcome.result.groups}
        finally:
            world.close()
    for label, values in results["local"].items():
        for stat, value in values.items():
            other = results["grpc"][label][stat]
            assert value is not None and other is not None
            assert math.isclose(value, other, rel_tol=1e-12, abs_tol=1e-9), (label, stat)


def test_groups_under_k_are_suppressed_never_numbers(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=400, k_min=5)
    world.subscribe()
    truth = mean_heart_rate_by_age(
        world.setup.population, edges=EDGES, window_days=30, as_of=AS_OF, bounds=(30, 220)
    )
    k = (truth["12-25"].count + truth["50-100"].count) // 2 + 1
    assert truth["12-25"].count < k <= truth["50-100"].count
    outcome = run_query(world.querier, heart_rate_spec(query__k=k), timeout_s=120)
    assert outcome.result is not None
    young = outcome.result.group("12-25")
    assert young.suppressed and dict(young.values) == {}
    old = outcome.result.group("50-100")
    assert not old.suppressed and old.values["count"] == truth["50-100"].count


def test_query_with_fewer_than_k_targets_is_refused_at_tf(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory(n=200, k_min=40)
    world.subscribe()
    from dispers.protocol.instance.functions import ages_at

    children = int((ages_at(world.setup.population.birth_days, AS_OF) < 12).sum())
    assert 0 < children < 40  # fewer targets than the cluster's k_min
    spec = heart_rate_spec(query__target="age:0-12", query__k=40)
    outcome = run_query(world.querier, spec, timeout_s=60)
    assert outcome.record.state == "refused"
    assert outcome.record.error_code == "TOO_FEW_TARGETS"
    assert outcome.result is None
    assert (
        "prepare" not in world.actors["conductor"].record(outcome.record.query_id).phases
    )  # nothing after TF
    assert all(da.active_queries == 0 for da in world.das.values())


def test_the_querys_own_k_is_no_oracle_on_the_target_count(world_factory: Callable[..., World]) -> None:
    """A querier may raise k above the cluster's k_min, but TF refuses only below k_min: a
    search over k, refused query after refused query, would otherwise give the exact number
    of targets (and, beside the released counts, a suppressed group's size). Above k_min the
    query runs, and groups under the querier's k are suppressed at the root as usual."""
    world = world_factory(n=300, k_min=5)
    world.subscribe()
    spec = heart_rate_spec(query__target="age:25-50", query__k=10_000)
    outcome = run_query(world.querier, spec, timeout_s=60)
    assert outcome.record.state == "done" and outcome.result is not None
    assert all(g.suppressed and not g.values for g in outcome.result.groups)
    assert outcome.result.contributions == 0 and outcome.result.declined is None


def test_out_of_bounds_contribution_is_dropped_and_counted(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory(n=300, outlier_bpm=250.0)
    world.subscribe()
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=120)
    assert outcome.result is not None
    # One value out of bounds: fewer than k, so the result says "under k" with no number.
    assert outcome.result.dropped["out_of_bounds"] is None
    assert set(outcome.result.dropped.values()) == {None}
    # Ground truth with the same bounds leaves the outlier out: the aggregate must too.
    assert_matches_truth(world, {g.label: dict(g.values) for g in outcome.result.groups})


@pytest.mark.parametrize("transport", ["local"])
def test_unsubscribe_removes_targets(world_factory: Callable[..., World]) -> None:
    from dispers.core.messages import SubscriptionOp

    world = world_factory(n=100)
    sets = world.actors["tf"]._sets
    tokens = [world.actors["ci"].token(c) for c in ("age:25-50", "sex:F", "has:heart_rate")]

    def memberships() -> list[frozenset[bytes]]:
        return [sets.members(t) for t in tokens]

    assert world.subscribe() == 100
    first = memberships()
    assert len(sets.universe()) == 100 and all(first)
    assert world.subscribe() == 100
    assert memberships() == first  # subscribing twice changes nothing
    assert world.host.subscribe_all(SubscriptionOp.UNSUBSCRIBE) == 100
    assert len(sets.universe()) == 0


@pytest.mark.parametrize("transport", ["local"])
def test_querier_refuses_a_roster_the_conductor_swapped(world_factory: Callable[..., World]) -> None:
    import dataclasses

    from dispers.core.config import Roster
    from dispers.core.errors import DispersError

    world = world_factory(n=50)
    conductor = world.actors["conductor"]
    real = conductor.get_roster("researcher")
    # A curious Conductor serves its own sealing key as the Concept Indexor's.
    forged = Roster(
        tuple(
            dataclasses.replace(e, sealing_key=real.get("conductor").sealing_key) if e.name == "ci" else e
            for e in real
        )
    )
    conductor.get_roster = lambda caller: forged
    with pytest.raises(DispersError) as info:
        world.querier.submit(heart_rate_spec())
    assert info.value.code.value == "CONFIG" and "differs" in info.value.message


@pytest.mark.parametrize("transport", ["local"])
def test_aggregator_forgets_an_abandoned_query_on_a_timer(world_factory: Callable[..., World]) -> None:
    """Invariant 3: a DA holds a query's state only for query_timeout_s, even if no call comes."""
    import dataclasses
    import time

    world = world_factory(n=50)
    da = world.das["da-1"]
    da._settings = dataclasses.replace(da._settings, query_timeout_s=0.2)
    envelope = world.querier_object.build(heart_rate_spec())
    da.prepare("conductor", envelope)  # the Conductor then vanishes: no finalize, no abort
    assert da.active_queries == 1
    deadline = time.monotonic() + 30
    while da.active_queries and time.monotonic() < deadline:
        time.sleep(0.05)
    assert da.active_queries == 0


def test_histogram_and_quantiles_through_the_cluster_equal_numpy(world_factory: Callable[..., World]) -> None:
    """With noise off, the histogram of each age group equals numpy's histogram of the values the
    instances hold (computed from the population's arrays), and each quantile lies in the bin
    of the true quantile."""
    import numpy as np

    from dispers.protocol.instance.functions import ages_at, bucketize
    from dispers.simulation.ground_truth import local_values

    world = world_factory(n=500)
    world.subscribe()
    edges = [float(e) for e in range(30, 225, 10)][:-1] + [220.0]
    spec = heart_rate_spec(
        aggregate__stats=["count", "histogram", "median", "quantiles"],
        aggregate__bins=edges,
        aggregate__quantiles=[0.25, 0.75],
    )
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.result is not None, outcome.record
    pop = world.setup.population
    values, has = local_values(pop, "mean_heart_rate", {"window_days": 30}, AS_OF)
    group = bucketize(ages_at(pop.birth_days, AS_OF), EDGES)
    ok = has & pop.consent & (group >= 0) & (values >= 30) & (values <= 220)
    for i, label in enumerate(("12-25", "25-50", "50-100")):
        mine = values[ok & (group == i)]
        g = outcome.result.group(label)
        assert list(g.histogram) == np.histogram(mine, bins=edges)[0].tolist()
        for key, level in (("median", 0.5), ("q0.25", 0.25), ("q0.75", 0.75)):
            lo, hi = g.intervals[key]
            assert lo - 1e-9 <= float(np.quantile(mine, level)) <= hi + 1e-9, (label, key)


def test_group_by_age_then_sex_by_name_equals_numpy(world_factory: Callable[..., World]) -> None:
    """Group-by two fields, the second by category names: each (age bracket, sex) group's count
    and mean equal numpy's over the population's arrays."""

    from dispers.protocol.instance.functions import ages_at, bucketize
    from dispers.simulation.ground_truth import local_values

    world = world_factory(n=500)
    world.subscribe()
    spec = heart_rate_spec(
        data__group_by={"field": "age", "edges": EDGES, "then": {"field": "sex", "categories": ["M", "F"]}},
        aggregate__stats=["count", "mean"],
    )
    assert spec.groups == ("12-25 & F", "12-25 & M", "25-50 & F", "25-50 & M", "50-100 & F", "50-100 & M")
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.result is not None, outcome.record
    pop = world.setup.population
    values, has = local_values(pop, "mean_heart_rate", {"window_days": 30}, AS_OF)
    age = bucketize(ages_at(pop.birth_days, AS_OF), EDGES)
    ok = has & pop.consent & (age >= 0) & (values >= 30) & (values <= 220)
    for i, bracket in enumerate(("12-25", "25-50", "50-100")):
        for sex, female in (("F", True), ("M", False)):
            mine = values[ok & (age == i) & (pop.female == female)]
            group = outcome.result.group(f"{bracket} & {sex}")
            if len(mine) < 10:
                assert group.suppressed
                continue
            assert group.values["count"] == len(mine)
            assert math.isclose(group.values["mean"], float(mine.mean()), rel_tol=1e-9)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["local"])
def test_bad_group_by_is_refused_naming_the_key(world_factory: Callable[..., World]) -> None:
    from dispers.core.errors import DispersError

    for group_by, named in (
        ({"field": "sex", "categories": ["X"]}, "categories"),
        ({"field": "age", "categories": ["F"]}, "not a categorical field"),
        ({"field": "age", "edges": [0, 50], "categories": ["F"]}, "exactly one of"),
        (
            {"field": "age", "edges": [0, 50], "then": {"field": "sex", "categories": ["F"], "then": {}}},
            "then",
        ),
    ):
        with pytest.raises(DispersError) as info:
            heart_rate_spec(data__group_by=group_by)
        assert named in info.value.message and "data.group_by" in info.value.message, info.value.message
