"""Property: the targets TF finds for any expression are exactly the instances whose own
documents make the expression true, computed here directly from the population."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispers.protocol.querier import run_query
from tests.integration.conftest import World, local_world
from tests.integration.world import AS_OF, heart_rate_spec, make_setup

CONCEPTS = ("age:0-12", "age:12-25", "age:25-50", "age:50-100", "sex:F", "sex:M", "has:heart_rate")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = local_world(make_setup(Path(tmp_path_factory.mktemp("prop")), n=300, k_min=2))
    w.subscribe()
    yield w
    w.close()


def truth_sets(world: World) -> dict[str, set[int]]:
    pop = world.setup.population
    ages = pop.ages_at(AS_OF)
    has = np.zeros(pop.n_instances, dtype=bool)
    has[pop.hr_owner] = True
    sets: dict[str, set[int]] = {}
    for lo, hi in ((0, 12), (12, 25), (25, 50), (50, 100)):
        sets[f"age:{lo}-{hi}"] = set(np.flatnonzero((ages >= lo) & (ages < hi)).tolist())
    sets["sex:F"] = set(np.flatnonzero(pop.female).tolist())
    sets["sex:M"] = set(np.flatnonzero(~pop.female).tolist())
    sets["has:heart_rate"] = set(np.flatnonzero(has).tolist())
    return sets


def expressions() -> st.SearchStrategy[tuple[str, object]]:
    leaf = st.sampled_from(CONCEPTS).map(lambda c: (c, ("ref", c)))

    def extend(children: st.SearchStrategy[tuple[str, object]]) -> st.SearchStrategy[tuple[str, object]]:
        return st.one_of(
            children.map(lambda a: (f"NOT ({a[0]})", ("not", a[1]))),
            st.tuples(children, children, st.sampled_from(["AND", "OR"])).map(
                lambda t: (f"({t[0][0]}) {t[2]} ({t[1][0]})", (t[2].lower(), t[0][1], t[1][1]))
            ),
        )

    return st.recursive(leaf, extend, max_leaves=5)


def evaluate(tree: object, sets: dict[str, set[int]], universe: set[int]) -> set[int]:
    assert isinstance(tree, tuple)
    if tree[0] == "ref":
        return sets[tree[1]]
    if tree[0] == "not":
        return universe - evaluate(tree[1], sets, universe)
    left, right = evaluate(tree[1], sets, universe), evaluate(tree[2], sets, universe)
    return left & right if tree[0] == "and" else left | right


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expression=expressions())
def test_targets_are_exactly_the_matching_instances(world: World, expression: tuple[str, object]) -> None:
    text, tree = expression
    sets = truth_sets(world)
    # NOT is relative to everyone subscribed: everybody here has a sex concept.
    universe = sets["sex:F"] | sets["sex:M"]
    expected = len(evaluate(tree, sets, universe))
    spec = heart_rate_spec(query__target=text, query__k=2, data__group_by={"field": "age", "edges": [0, 150]})
    outcome = run_query(world.querier, spec, timeout_s=60)
    if expected < 2:
        assert outcome.record.state == "refused"
        assert outcome.record.error_code == "TOO_FEW_TARGETS"
    else:
        assert outcome.record.state == "done", outcome.record
        assert world.actors["conductor"].record(outcome.record.query_id).counts["targets"] == expected
