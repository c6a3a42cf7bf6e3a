"""Differential privacy through the whole cluster: on by default, charged to a budget per
querier at the root DA, refused before any instance is contacted when it would overspend."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.querier import run_query
from dispers.simulation.ground_truth import mean_heart_rate_by_age
from tests.integration.conftest import World
from tests.integration.world import AS_OF, heart_rate_spec

EDGES = [12, 25, 50, 100]


def dp_spec(**overrides: Any) -> Any:
    """The heart-rate query without min and max, which DP refuses."""
    overrides.setdefault("aggregate__stats", ["count", "sum", "mean", "var", "std"])
    return heart_rate_spec(**overrides)


def _budget(world: World, total: float) -> None:
    """Give the root DA (and the querier's config) a small epsilon budget."""
    root = world.das["da-root"]
    root._settings = dataclasses.replace(root._settings, budget_epsilon=total)


def test_a_dp_cluster_releases_noised_numbers_with_intervals(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=600, dp=True)
    world.subscribe()
    outcome = run_query(world.querier, dp_spec(aggregate__stats=["count", "mean", "std"]), timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    result = outcome.result
    assert result is not None and result.privacy.noised and result.privacy.epsilon == 1.0
    truth = mean_heart_rate_by_age(
        world.setup.population, edges=EDGES, window_days=30, as_of=AS_OF, bounds=(30, 220)
    )
    for g in result.groups:
        if g.suppressed:
            continue
        t = truth[g.label]
        assert set(g.intervals) == {"count", "mean", "std"}
        # Far outside 3 half-widths would be a calibration bug (or no noise at all).
        for stat, true in (("count", t.count), ("mean", t.mean)):
            lo, hi = g.intervals[stat]
            half = (hi - lo) / 2
            assert abs(g.values[stat] - true) <= 3 * half + 1e-9, (g.label, stat)  # type: ignore[operator]
        assert g.values["count"] != t.count or g.values["mean"] != t.mean  # noised
    # The exact numbers are not released: under DP, min and max are refused before sealing.
    with pytest.raises(DispersError) as info:
        world.querier.submit(heart_rate_spec(aggregate__stats=["count", "min"]))
    assert info.value.code is ErrorCode.MALFORMED and "min" in info.value.message


def test_the_budget_is_charged_and_an_overspending_query_contacts_no_one(
    world_factory: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_factory(n=300, dp=True)
    world.subscribe()
    _budget(world, 2.5)
    spec = dp_spec(privacy__epsilon=1.0)
    for expected_left in (1.5, 0.5):
        outcome = run_query(world.querier, spec, timeout_s=120)
        assert outcome.result is not None
        assert outcome.result.privacy.epsilon_left == pytest.approx(expected_left)
    asked: list[Any] = []
    host = world.actors["pc-1"]
    original = host.contribute
    monkeypatch.setattr(host, "contribute", lambda *a: asked.append(a) or original(*a))
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.record.state == "failed" and outcome.record.error_code == "BUDGET_EXCEEDED"
    assert asked == []  # refused at prepare, before T contacted any host
    status = world.das["da-root"].budget("researcher", "researcher")
    assert status.queries == 2 and status.spent.epsilon == pytest.approx(2.0)
    # A cheaper query still fits.
    cheap = run_query(world.querier, dp_spec(privacy__epsilon=0.5), timeout_s=120)
    assert cheap.result is not None and cheap.result.privacy.epsilon_left == pytest.approx(0.0)


def test_a_query_that_ends_without_a_release_is_refunded(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=200, dp=True)
    world.subscribe()
    root = world.das["da-root"]
    envelope = world.querier_object.build(dp_spec())
    peers = world.peers
    tokens = peers.concept_indexor().tokenize_query(envelope)
    found = peers.target_finder().find_targets(envelope, tokens)
    peers.data_aggregator("da-root").prepare(envelope, found.sealed_attestation)
    assert root.budget("researcher", "researcher").spent.epsilon == pytest.approx(1.0)
    peers.data_aggregator("da-root").abort(envelope.query_id)  # the query failed: nothing released
    assert root.budget("researcher", "researcher").spent.epsilon == 0.0


def test_only_the_querier_reads_its_budget(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=50, dp=True)
    root = world.das["da-root"]
    for caller in ("conductor", "t", "pc-1"):
        with pytest.raises(DispersError) as info:
            root.budget(caller, "researcher")
        assert info.value.code is ErrorCode.UNAUTHORIZED


def test_epsilon_above_the_per_query_maximum_is_refused_before_sealing(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory(n=50, dp=True)
    with pytest.raises(DispersError) as info:
        world.querier.submit(dp_spec(privacy__epsilon=50.0))
    assert info.value.code is ErrorCode.MALFORMED and "per-query maximum" in info.value.message
