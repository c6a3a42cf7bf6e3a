"""Several fields per contribution through the cluster: per-field statistics, covariance,
correlation and least squares against numpy on the population's own values; the known linear
relation of the synthetic population recovered; bad multi-field specs refused by key."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.spec import parse_query_spec
from dispers.protocol.instance.functions import ages_at, bucketize
from dispers.protocol.querier import run_query
from dispers.simulation.ground_truth import local_values
from dispers.simulation.population import HR_MODEL
from tests.integration.conftest import World
from tests.integration.world import AS_OF

EDGES = [12, 50, 100]
FIELDS = [
    {"name": "hr", "function": "mean_heart_rate", "params": {"window_days": 30}, "bounds": [30, 220]},
    {"name": "weight", "function": "mean_weight_kg", "params": {"window_days": 90}, "bounds": [2, 250]},
    {"name": "steps", "function": "mean_steps", "params": {"window_days": 30}, "bounds": [0, 40000]},
]


TIGHT = [
    {**FIELDS[0], "bounds": [40, 110]},
    {**FIELDS[1], "bounds": [20, 130]},
    {**FIELDS[2], "bounds": [0, 16000]},
]


def study(**aggregate: Any) -> dict[str, Any]:
    return {
        "query": {"target": "age:12-25 OR age:25-50 OR age:50-100", "k": 10},
        "data": {
            "as_of": AS_OF.isoformat(),
            "fields": FIELDS,
            "group_by": {"field": "age", "edges": EDGES},
        },
        "aggregate": {
            "stats": ["count", "mean", "std", "cov", "corr", "ols"],
            "regression": {"y": "hr", "x": ["weight", "steps"]},
            **aggregate,
        },
    }


def truth_rows(world: World) -> tuple[np.ndarray, np.ndarray]:
    """(bracket index, values of hr, weight, steps) of every instance that contributes: it
    consents, has all three values, each within its bounds, and is in a bracket."""
    pop = world.setup.population
    columns, ok = [], pop.consent.copy()
    for f in FIELDS:
        values, has = local_values(pop, f["function"], f["params"], AS_OF)
        lo, hi = f["bounds"]
        ok &= has & (values >= lo) & (values <= hi)
        columns.append(values)
    bracket = bucketize(ages_at(pop.birth_days, AS_OF), EDGES)
    ok &= bracket >= 0
    return bracket[ok], np.column_stack(columns)[ok]


def test_every_multi_field_statistic_equals_numpy(world_factory: Callable[..., World]) -> None:
    world = world_factory(n=700)
    world.subscribe()
    outcome = run_query(world.querier, parse_query_spec(study()), timeout_s=120)
    result = outcome.result
    assert result is not None, outcome.record
    brackets, rows = truth_rows(world)
    names = ("hr", "weight", "steps")
    for i, label in enumerate(("12-50", "50-100")):
        mine = rows[brackets == i]
        group = result.group(label)
        assert not group.suppressed and group.values["count"] == len(mine)
        for f, name in enumerate(names):
            assert math.isclose(group.values[f"{name}.mean"], mine[:, f].mean(), rel_tol=1e-9)  # type: ignore[arg-type]
            assert math.isclose(group.values[f"{name}.std"], mine[:, f].std(ddof=1), rel_tol=1e-9)  # type: ignore[arg-type]
        cov = np.cov(mine, rowvar=False)
        corr = np.corrcoef(mine, rowvar=False)
        for a in range(3):
            for b in range(a + 1, 3):
                key = f"{names[a]},{names[b]}"
                assert math.isclose(group.values[f"cov({key})"], cov[a, b], rel_tol=1e-8)  # type: ignore[arg-type]
                assert math.isclose(group.values[f"corr({key})"], corr[a, b], rel_tol=1e-8)  # type: ignore[arg-type]
        design = np.column_stack([np.ones(len(mine)), mine[:, 1], mine[:, 2]])
        beta = np.linalg.lstsq(design, mine[:, 0], rcond=None)[0]
        for k, term in enumerate(("intercept", "weight", "steps")):
            assert math.isclose(group.values[f"ols.{term}"], beta[k], rel_tol=1e-7), term  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["local"])
def test_the_populations_known_relation_is_recovered_with_and_without_dp(
    world_factory: Callable[..., World],
) -> None:
    """The synthetic heart rate follows 70 + 0.25 (weight - 75) - 0.0004 (steps - 7000) + noise:
    the regression recovers both slopes within 3 of its stated standard errors (exact), and
    within its stated 95% interval widened by half under DP (noise and sampling error)."""
    world = world_factory(n=2500, dp=True)
    world.subscribe()
    spec = parse_query_spec(
        {
            **study(stats=["count", "ols"]),
            "query": {"target": "age:25-50 OR age:50-100", "k": 10},
            "data": {"as_of": AS_OF.isoformat(), "fields": TIGHT},
            "privacy": {"epsilon": 2.0},
        }
    )
    outcome = run_query(world.querier, spec, timeout_s=300)
    result = outcome.result
    assert result is not None and result.privacy.noised, outcome.record
    group = result.groups[0]
    for term, true in (("weight", HR_MODEL["weight_kg"]), ("steps", HR_MODEL["steps"])):
        value = group.values[f"ols.{term}"]
        lo, hi = group.intervals[f"ols.{term}"]
        assert value is not None and lo < value < hi
        assert abs(value - true) < 1.5 * (hi - lo) / 2, (term, value, lo, hi)
    # The same population with DP off: the exact coefficients are within 3 standard errors.
    _, rows = truth_rows(world)
    design = np.column_stack([np.ones(len(rows)), rows[:, 1], rows[:, 2]])
    beta = np.linalg.lstsq(design, rows[:, 0], rcond=None)[0]
    resid = rows[:, 0] - design @ beta
    se = np.sqrt(resid @ resid / (len(rows) - 3) * np.diag(np.linalg.inv(design.T @ design)))
    assert abs(beta[1] - HR_MODEL["weight_kg"]) < 3 * se[1]
    assert abs(beta[2] - HR_MODEL["steps"]) < 3 * se[2]


@pytest.mark.parametrize("transport", ["local"])
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda s: s["data"]["fields"].append({"name": "x", "function": "nope", "bounds": [0, 1]}),
            "data.fields[3]",
        ),
        (lambda s: s["data"]["fields"][1].update(params={"window_days": 0}), "data.fields[1]"),
        (lambda s: s["aggregate"].update(regression={"y": "hr", "x": ["bmi"]}), "bmi"),
        (lambda s: s["aggregate"].pop("regression"), "regression"),
        (lambda s: s["aggregate"].update(bounds=[0, 1]), "aggregate.bounds"),
        (lambda s: s["data"]["fields"][0].pop("bounds"), "data.fields[0].bounds"),
        (lambda s: s["data"]["fields"][0].update(bounds=[5, 1]), "data.fields[0].bounds"),
        (lambda s: s["data"]["fields"][0].update(units="bpm"), "data.fields[0].units"),
        (lambda s: s["data"]["fields"][1].update(name="hr"), "distinct"),
        (lambda s: s["data"].update(fields=FIELDS[:1]), "at least two fields"),
        (lambda s: s["data"].update(function="age"), "data.function"),
        (lambda s: s["aggregate"].update(out_of_bounds="wrap"), "aggregate.out_of_bounds"),
        (
            lambda s: s["data"]["fields"].extend([{**FIELDS[0], "name": f"f{i}"} for i in range(2)]),
            "max_fields",
        ),
    ],
)
def test_bad_multi_field_specs_are_refused_before_any_instance_is_contacted(
    world_factory: Callable[..., World], change: Callable[[dict[str, Any]], Any], named: str
) -> None:
    world = world_factory(n=60)
    raw = study()
    raw["data"]["fields"] = [dict(f) for f in FIELDS]
    change(raw)
    with pytest.raises(DispersError) as info:
        world.querier.submit(parse_query_spec(raw))
    assert info.value.code in (ErrorCode.MALFORMED, ErrorCode.NOT_FOUND)
    assert named in info.value.message, info.value.message
    assert world.actors["conductor"]._store.list_ids() == []  # the Conductor never saw the query


@pytest.mark.parametrize("transport", ["local"])
def test_clip_mode_keeps_out_of_bounds_contributions_at_their_bound(
    world_factory: Callable[..., World],
) -> None:
    """With out_of_bounds = "clip", steps beyond a low upper bound count at the bound, and the
    result says how many were clipped; with "drop" they are left out and counted as dropped."""
    world = world_factory(n=500)
    world.subscribe()
    fields = [FIELDS[0], {**FIELDS[2], "bounds": [0, 8000]}]
    base = {
        "query": {"target": "age:25-50 OR age:50-100", "k": 10},
        "data": {"as_of": AS_OF.isoformat(), "fields": fields},
    }
    pop = world.setup.population
    hr, has_hr = local_values(pop, "mean_heart_rate", {"window_days": 30}, AS_OF)
    steps, has_steps = local_values(pop, "mean_steps", {"window_days": 30}, AS_OF)
    age = ages_at(pop.birth_days, AS_OF)
    ok = pop.consent & has_hr & has_steps & (age >= 25) & (age < 100) & (hr >= 30) & (hr <= 220)
    over = ok & (steps > 8000)
    assert over.sum() >= 10
    clipped = run_query(
        world.querier,
        parse_query_spec({**base, "aggregate": {"stats": ["count", "mean"], "out_of_bounds": "clip"}}),
        timeout_s=120,
    ).result
    assert clipped is not None
    assert clipped.clipped == int(over.sum())
    assert clipped.groups[0].values["count"] == int(ok.sum())
    got = clipped.groups[0].values["steps.mean"]
    assert got is not None and math.isclose(got, np.minimum(steps[ok], 8000).mean(), rel_tol=1e-9)
    dropped = run_query(
        world.querier, parse_query_spec({**base, "aggregate": {"stats": ["count", "mean"]}}), timeout_s=120
    ).result
    assert dropped is not None and dropped.clipped is None
    assert dropped.dropped["out_of_bounds"] == int(over.sum())
    assert dropped.groups[0].values["count"] == int((ok & ~over).sum())
