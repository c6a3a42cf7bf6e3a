"""Bad query specs are refused before any instance is contacted, with an error naming the key:
unknown function or field, bad params, overlapping bins, missing bounds, k below the cluster's
minimum, epsilon above the per-query maximum, min/max under DP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.spec import QuerySpec, parse_query_spec
from tests.integration.conftest import World
from tests.integration.world import heart_rate_spec


def without_bounds() -> QuerySpec:
    raw = heart_rate_spec().to_obj()
    del raw["aggregate"]["bounds"]
    return parse_query_spec(raw)


SECOND = {"field": "bmi", "edges": [0, 1]}

CASES: list[tuple[str, Callable[[], QuerySpec], ErrorCode, str]] = [
    ("unknown function", lambda: heart_rate_spec(data__function="mean_heartrate"), ErrorCode.NOT_FOUND,
     "data.function: unknown local function 'mean_heartrate'"),
    ("bad param", lambda: heart_rate_spec(data__params={"window_days": 0}), ErrorCode.MALFORMED,
     "data.params: mean_heart_rate: parameter 'window_days' must be in [1, 3650]"),
    ("unknown param", lambda: heart_rate_spec(data__params={"windows": 3}), ErrorCode.MALFORMED,
     "data.params: mean_heart_rate: unknown parameter 'windows'"),
    ("unknown group field", lambda: heart_rate_spec(data__group_by={"field": "height", "edges": [0, 9]}),
     ErrorCode.NOT_FOUND, "data.group_by.field: unknown group-by field 'height' (the fields are: age, sex)"),
    ("unknown second field",
     lambda: heart_rate_spec(data__group_by={"field": "age", "edges": [0, 9], "then": SECOND}),
     ErrorCode.NOT_FOUND, "data.group_by.then.field: unknown group-by field 'bmi'"),
    ("overlapping bins",
     lambda: heart_rate_spec(aggregate__stats=["histogram"], aggregate__bins=[30, 100, 90, 220]),
     ErrorCode.MALFORMED, "aggregate.bins must be strictly increasing"),
    ("missing bounds", without_bounds, ErrorCode.MALFORMED, "aggregate.bounds is required"),
    ("k below the minimum", lambda: heart_rate_spec(query__k=3), ErrorCode.MALFORMED,
     "query.k = 3 is below the cluster minimum 5"),
    ("epsilon above the maximum",
     lambda: heart_rate_spec(aggregate__stats=["count"], privacy__epsilon=5.0), ErrorCode.MALFORMED,
     "privacy.epsilon is above the cluster's per-query maximum 2"),
    ("min under DP", lambda: heart_rate_spec(aggregate__stats=["count", "min"]), ErrorCode.MALFORMED,
     "min release one person's value"),
]  # fmt: skip


@pytest.mark.parametrize("transport", ["local"])
@pytest.mark.parametrize(("name", "make", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_spec_is_refused_naming_its_key_before_anyone_is_contacted(
    world_factory: Callable[..., World], name: str, make: Callable[[], Any], code: ErrorCode, message: str
) -> None:
    world = world_factory(n=30, dp=True)
    with pytest.raises(DispersError) as info:
        world.querier.submit(make())
    assert info.value.code is code, (name, info.value)
    assert message in info.value.message, (name, info.value.message)
    assert world.actors["conductor"]._store.list_ids() == []  # nothing reached the Conductor
    assert world.das["da-root"].budget("researcher", "researcher").spent.epsilon == 0.0
