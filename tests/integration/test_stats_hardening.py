"""Attacks on the multi-field statistics and their frames, from an adversarial review: each
must fail. A querier that lifts its own max_fields, a child DA sending an impossible partial,
frames sized to the worst case, reserved field names, bounds the noise cannot be calibrated for."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dispers.core.config import ClusterSettings
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import new_query_id
from dispers.core.spec import AggregateSpec, GroupBy, Privacy, parse_query_spec
from dispers.crypto.keys import SealingKeyPair, SigningKeyPair
from dispers.protocol.aggregation.partial import Partial, worst_case_sizes
from dispers.protocol.aggregation.release import release_dp
from dispers.protocol.assemble import check_frames
from dispers.protocol.common import seal_signed
from dispers.protocol.querier import run_query
from tests.integration.conftest import World
from tests.integration.world import AS_OF, heart_rate_spec


def many_fields(target: str, n: int = 50) -> Any:
    fields = [{"name": f"f{i}", "function": "mean_heart_rate", "bounds": [30, 220]} for i in range(n)]
    return parse_query_spec({
        "query": {"target": target, "k": 5},
        "data": {"as_of": AS_OF.isoformat(), "fields": fields,
                 "group_by": {"field": "age", "edges": [12, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100]}},
        "aggregate": {"stats": ["count", "mean"]},
        "privacy": {"epsilon": 1.0},
    })  # fmt: skip


@pytest.mark.parametrize("transport", ["local"])
def test_a_querier_lifting_its_own_max_fields_is_refused_by_every_actor(
    world_factory: Callable[..., World],
) -> None:
    """50 fields where the cluster allows 4: without the DAs' check, a leaf's partial overflowed
    its frame only when enough groups held targets (an exact, free bit about the data). The root
    refuses the spec at prepare, before any charge or any instance is contacted."""
    world = world_factory(n=200, dp=True)
    world.subscribe()
    q = world.querier_object
    q._settings = dataclasses.replace(q._settings, max_fields=64)  # the querier's own, modified code
    outcome = run_query(world.querier, many_fields("age:12-25 OR age:25-50 OR age:50-100"), timeout_s=120)
    assert outcome.record.state == "failed" and "max_fields" in (outcome.record.error_message or "")
    counts = world.actors["conductor"].record(outcome.record.query_id).counts
    assert counts.get("forwarded", 0) == 0  # no instance was asked
    assert world.das["da-root"].budget("researcher", "researcher").spent.epsilon == 0.0
    # T and the hosts check too: a request with too many fields never reaches an instance.
    envelope = q.build(many_fields("age:12-25"))
    with pytest.raises(DispersError) as info:
        world.actors["t"]._open_request(envelope)
    assert info.value.code is ErrorCode.MALFORMED and "max_fields" in info.value.message


def _partial_obj(
    count: list[int], mean: list[list[float]], co: list[list[float]], **kw: Any
) -> dict[str, Any]:
    width = len(mean[0])
    lo = [[0.0] * width for _ in count]
    hi = [[1.0] * width for _ in count]
    return {"count": count, "mean": mean, "co": co, "min": lo, "max": hi, "dropped": {}, **kw}


@pytest.mark.parametrize(
    ("obj", "fields"),
    [
        (_partial_obj([2], [[1e9, 0.5]], [[0.1, 0.0, 0.1]]), 2),  # a mean far outside [0, 1]
        (_partial_obj([2], [[0.5, 0.5]], [[0.1, 5.0, 0.1]]), 2),  # |cov| beyond sqrt(var var)
        (_partial_obj([2], [[0.5, 0.5]], [[9.0, 0.0, 0.1]]), 2),  # more spread than [0, 1] allows
        (_partial_obj([2], [[0.5]], [[0.1]], clipped=3), 1),  # more clipped than counted
    ],
)
def test_a_child_partial_no_values_within_the_bounds_could_give_is_refused(
    obj: dict[str, Any], fields: int
) -> None:
    """A malicious leaf could otherwise amplify one person's value far beyond the noise."""
    partial = Partial.from_obj(obj, 1, (), fields)
    with pytest.raises(DispersError) as info:
        partial.check_possible(((0.0, 1.0),) * fields)
    assert info.value.code is ErrorCode.MALFORMED


def test_counts_cannot_wrap_around_and_huge_ones_are_malformed() -> None:
    big = 2**62
    p = Partial.from_obj(_partial_obj([big, big, 3], [[0.5]] * 3, [[0.0]] * 3), 3, (), 1)
    assert p.items == 2 * big + 3  # Python integers: the root's items <= attested check holds
    with pytest.raises(DispersError) as info:
        Partial.from_obj(_partial_obj([2**70], [[0.5]], [[0.0]]), 1, (), 1)
    assert info.value.code is ErrorCode.MALFORMED


def test_the_result_frame_holds_the_worst_legal_spec_whatever_is_released() -> None:
    """With result_bytes at the minimum check_frames asks, the longest legal spec — 128 groups
    labelled by two fields, 32 bins, 16 quantiles whose keys are as long as they get — still fits
    with every group released (before, 16 quantile keys counted as one, labels as one field's)."""
    g1, g2, bins_n = 16, 8, 32
    e1 = tuple(-1.2345678901234567 * 10.0 ** (-300 - i) for i in range(g1 + 1))
    e2 = tuple(-1.2345678901234567 * 10.0 ** (-280 - i) for i in range(g2 + 1))
    labels = GroupBy("age", e1, (), GroupBy("age", e2)).labels
    assert max(len(label) for label in labels) <= 101
    lo, hi = -2.2345678901234567e-150, -1.2345678901234567e-150
    bins = tuple([lo] + [lo + (hi - lo) * (i + 0.123456789) / bins_n for i in range(1, bins_n)] + [hi])
    qs = tuple(sorted(1.23456789e-300 * (i + 1) for i in range(16)))
    stats = ("count", "sum", "mean", "var", "std", "histogram", "median", "quantiles")
    spec = AggregateSpec(new_query_id(), 2, (lo, hi), stats, labels, bins=bins, quantiles=qs)
    settings = ClusterSettings(max_groups=128, max_bins=bins_n, max_fields=1)
    settings = dataclasses.replace(settings, result_bytes=worst_case_sizes(128, bins_n, 16, 1)[1])
    check_frames(settings)
    rng = np.random.default_rng(1)
    values = lo + (hi - lo) * rng.random(len(labels) * 500)
    partial = Partial.of(len(labels), np.repeat(np.arange(len(labels)), 500), values, bins)
    result = release_dp(partial, spec, Privacy(1.0, 1e-6, "gaussian"), left=(1.0, 1e-6))
    assert not any(g.suppressed for g in result.groups)
    result = dataclasses.replace(result, plan={"root": "da-root", "depth": 2, "leaves": 2, "aggregators": 3,
                                               "fan_out": 2})  # fmt: skip
    seal_signed(
        SealingKeyPair.generate().public, SigningKeyPair.generate(), "da-root",
        {"query_id": spec.query_id, "result": result.to_obj()}, settings.result_bytes, "query result",
    )  # fmt: skip


@pytest.mark.parametrize("name", ["ols", "cov", "corr", "se", "intercept", "r2"])
def test_reserved_field_names_are_refused(name: str) -> None:
    """A field named ols had its ols.std taken for a regression key (released as a variance)."""
    fields = [
        {"name": name, "function": "mean_heart_rate", "bounds": [30, 220]},
        {"name": "b", "function": "mean_steps", "bounds": [0, 20000]},
    ]
    with pytest.raises(DispersError) as info:
        parse_query_spec({"query": {"target": "age:12-25"}, "data": {"fields": fields}})
    assert "reserved" in info.value.message


@pytest.mark.parametrize("transport", ["local"])
def test_bounds_the_noise_cannot_be_calibrated_for_are_refused_before_anything_is_charged(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory(n=30, dp=True)
    spec = heart_rate_spec(aggregate__bounds=[1e-200, 2e-200], aggregate__stats=["count", "std"])
    with pytest.raises(DispersError) as info:
        world.querier.submit(spec)
    assert "aggregate.bounds" in info.value.message and "sensitivity" in info.value.message
    assert world.das["da-root"].budget("researcher", "researcher").spent.epsilon == 0.0
