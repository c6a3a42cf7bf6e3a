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


def test_a_charged_query_that_ends_without_a_release_is_not_refunded(
    world_factory: Callable[..., World],
) -> None:
    """Once the root has charged a query, instances may answer; whether it then fails could
    depend on their data, so an abort refunds nothing (a refund would make that bit free)."""
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
    assert root.budget("researcher", "researcher").spent.epsilon == pytest.approx(1.0)


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


def test_under_dp_tiny_targets_are_charged_and_suppressed_not_refused(
    world_factory: Callable[..., World],
) -> None:
    """Found by review: TF's exact refusal below k_min cost nothing, so a querier could learn,
    free and as often as it liked, whether any expression's population is below k_min. Under
    DP the query is not refused: it runs, is charged, and its groups are suppressed on their
    noised counts."""
    world = world_factory(n=300, dp=True, k_min=40)
    world.subscribe()
    outcome = run_query(world.querier, dp_spec(query__target="age:0-12", query__k=40), timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    assert outcome.result is not None and outcome.result.privacy.noised
    assert world.das["da-root"].budget("researcher", "researcher").queries == 1


def test_a_child_partial_under_another_spec_is_refused(world_factory: Callable[..., World]) -> None:
    """Found by review: each DA opens its own sealed copy of the spec; a querier sealing the
    leaves wide bounds and the root (which calibrates the noise) tiny ones got exact sums. A
    parent now refuses a partial computed under another spec."""
    import dataclasses as dc

    from dispers.core.spec import AggregateSpec
    from dispers.protocol.common import seal_padded

    world = world_factory(n=300, dp=True)
    world.subscribe()
    q = world.querier_object
    envelope = q.build(dp_spec(aggregate__stats=["count", "sum"]))
    roster, settings = world.setup.config.roster, world.setup.config.settings
    specs = []
    for name, ct in envelope.sealed_specs:
        if name == "da-root":
            opener_spec = AggregateSpec(
                envelope.query_id, envelope.k, (0.0, 1e-6), ("count", "sum"), ("12-25", "25-50", "50-100")
            )
            ct = seal_padded(roster.get(name).sealing_key, opener_spec.to_obj(), settings.spec_bytes, "spec")
        specs.append((name, ct))
    keys = world.setup.keys("researcher")
    forged = dc.replace(envelope, sealed_specs=tuple(specs))
    forged = dc.replace(forged, signature=keys.signing.sign(forged.signing_bytes()))
    conductor = world.peers_as("researcher").conductor()
    query_id = conductor.submit(forged)
    assert conductor.status(query_id, wait_s=60).state == "failed"
    record = world.actors["conductor"].record(query_id)
    assert record.state == "failed" and record.error_code == "MALFORMED"
    assert "another aggregate spec" in str(record.error_message)
    assert record.sealed_result is None


@pytest.mark.parametrize("transport", ["local"])
def test_an_abort_racing_the_release_refunds_nothing(
    world_factory: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a Conductor calling Abort while the root was computing the release got
    the query refunded while the result was still sealed to Q (8 releases at epsilon 2 left the
    ledger at 0). The root now consumes the query's state before it computes: the abort finds
    nothing, and the charge stays."""
    import threading

    import dispers.protocol.data_aggregator as da_module

    world = world_factory(n=300, dp=True)
    world.subscribe()
    real = da_module.release_dp

    def racing(partial: Any, spec: Any, privacy: Any, **kw: Any) -> Any:
        t = threading.Thread(target=lambda: world.peers.data_aggregator("da-root").abort(spec.query_id))
        t.start()
        t.join()  # the Conductor's Abort lands while the result is computed
        return real(partial, spec, privacy, **kw)

    monkeypatch.setattr(da_module, "release_dp", racing)
    outcomes = [run_query(world.querier, dp_spec(privacy__epsilon=2.0), timeout_s=120) for _ in range(3)]
    assert all(o.result is not None for o in outcomes)
    assert world.das["da-root"].budget("researcher", "researcher").spent.epsilon == pytest.approx(6.0)
