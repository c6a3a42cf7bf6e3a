"""Tests of the instance's local functions, group-by fields and derived concepts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, timedelta

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.instance.concepts import (
    AGE_CONCEPTS,
    CONCEPT_PATTERN,
    derive_concepts,
    validate_concept,
)
from dispers.protocol.instance.functions import (
    FIELDS,
    FUNCTIONS,
    SEX_CODES,
    SEX_EDGES,
    LocalValues,
    ages_at,
    bucketize,
    compute_contributions,
    get_function,
    validate_params,
)
from dispers.simulation.ground_truth import mean_heart_rate_by_age
from dispers.simulation.population import Population, PopulationSpec, generate
from dispers.state.documents import DocumentStore, epoch_day

AS_OF = date(2026, 11, 1)
EDGES = (12.0, 25.0, 50.0, 100.0)


@pytest.fixture(scope="module")
def loaded() -> tuple[Population, DocumentStore]:
    pop = generate(PopulationSpec(n_instances=2_000, seed=5, as_of=AS_OF))
    store = DocumentStore()
    pop.write(store)
    return pop, store


def _contributions(
    store: DocumentStore,
    ids: Sequence[str],
    *,
    function: str = "mean_heart_rate",
    params: Mapping[str, object] | None = None,
    group_field: str | None = "age",
    edges: Sequence[float] | None = EDGES,
) -> LocalValues:
    return compute_contributions(
        store,
        ids,
        function=function,
        params={} if params is None else params,
        as_of=AS_OF,
        group_field=group_field,
        edges=edges,
    )


@pytest.mark.parametrize("window_days", [30, 7, 90])
def test_contributions_match_ground_truth(loaded: tuple[Population, DocumentStore], window_days: int) -> None:
    pop, store = loaded
    ids = store.instance_ids()[::-1]  # any order: results follow the ids given
    local = compute_contributions(
        store,
        ids,
        function="mean_heart_rate",
        params={"window_days": window_days},
        as_of=AS_OF,
        group_field="age",
        edges=EDGES,
    )
    truth = mean_heart_rate_by_age(pop, edges=EDGES, window_days=window_days, as_of=AS_OF)
    assert len(truth) == 3 and sum(t.count for t in truth.values()) > 500
    assert np.isnan(local.values[~local.ok]).all()
    for g, label in enumerate(truth):
        mine = local.values[local.ok & (local.groups == g)]
        t = truth[label]
        assert len(mine) == t.count
        assert mine.mean() == pytest.approx(t.mean, abs=1e-9)
        assert mine.sum() == pytest.approx(t.sum, abs=1e-9 * max(1.0, abs(t.sum)))
        assert mine.min() == pytest.approx(t.min, abs=1e-9)
        assert mine.max() == pytest.approx(t.max, abs=1e-9)
        assert np.var(mine, ddof=1) == pytest.approx(t.var, abs=1e-9)

    # Bounds as a DA applies them: drop contributed values outside [lo, hi].
    lo, hi = 65.0, 75.0
    bounded = mean_heart_rate_by_age(pop, edges=EDGES, window_days=window_days, as_of=AS_OF, bounds=(lo, hi))
    inside = local.ok & (local.values >= lo) & (local.values <= hi)
    for g, label in enumerate(bounded):
        assert int((inside & (local.groups == g)).sum()) == bounded[label].count


def test_ungrouped_and_sex_grouped(loaded: tuple[Population, DocumentStore]) -> None:
    pop, store = loaded
    ids = pop.instance_ids
    plain = compute_contributions(
        store, ids, function="mean_heart_rate", params={}, as_of=AS_OF, group_field=None, edges=None
    )
    assert (plain.groups == 0).all()
    values, has = get_function("mean_heart_rate")(store, ids, {}, AS_OF)
    np.testing.assert_array_equal(plain.ok, pop.consent & has)
    assert plain.ok.sum() < len(ids)  # some decline, some have no recent measurement

    by_sex = compute_contributions(
        store,
        ids,
        function="mean_heart_rate",
        params={},
        as_of=AS_OF,
        group_field="sex",
        edges=[0, 1, 2],
    )
    np.testing.assert_array_equal(by_sex.groups, np.where(pop.female, 0, 1))
    np.testing.assert_array_equal(by_sex.ok, plain.ok)


def test_sex_groups_follow_the_documented_codes(loaded: tuple[Population, DocumentStore]) -> None:
    pop, store = loaded
    codes = FIELDS["sex"](store, pop.instance_ids, AS_OF)
    np.testing.assert_array_equal(codes, np.where(pop.female, SEX_CODES["F"], SEX_CODES["M"]))
    local = _contributions(store, pop.instance_ids, group_field="sex", edges=SEX_EDGES)
    assert set(local.groups.tolist()) == {SEX_CODES["F"], SEX_CODES["M"]}


def test_age_function_matches_age_field(loaded: tuple[Population, DocumentStore]) -> None:
    pop, store = loaded
    values, has = get_function("age")(store, pop.instance_ids, {}, AS_OF)
    assert has.all()
    np.testing.assert_array_equal(values, FIELDS["age"](store, pop.instance_ids, AS_OF))


def test_age_field_matches_population(loaded: tuple[Population, DocumentStore]) -> None:
    pop, store = loaded
    for as_of in (AS_OF, date(2024, 2, 29), date(2025, 2, 28), date(2025, 3, 1)):
        np.testing.assert_array_equal(ages_at(pop.birth_days, as_of), pop.ages_at(as_of))
        np.testing.assert_array_equal(FIELDS["age"](store, pop.instance_ids, as_of), pop.ages_at(as_of))


def test_unknown_function_and_field() -> None:
    store = DocumentStore()
    with pytest.raises(DispersError) as info:
        get_function("run_shell")
    assert info.value.code is ErrorCode.NOT_FOUND and "run_shell" in info.value.message
    with pytest.raises(DispersError) as info:
        _contributions(store, [], function="run_shell")
    assert info.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(DispersError) as info:
        _contributions(store, [], group_field="income")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert "mean_heart_rate" in FUNCTIONS


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"window": 30}, "window"),
        ({"window_days": "30"}, "window_days"),
        ({"window_days": 30.0}, "window_days"),
        ({"window_days": True}, "window_days"),
        ({"window_days": 0}, "window_days"),
        ({"window_days": 3651}, "window_days"),
    ],
)
def test_bad_params_are_malformed(params: dict[str, object], named: str) -> None:
    store = DocumentStore()
    with pytest.raises(DispersError) as info:
        _contributions(store, [], params=params)
    assert info.value.code is ErrorCode.MALFORMED and named in info.value.message
    with pytest.raises(DispersError) as info:
        get_function("mean_heart_rate")(store, [], params, AS_OF)
    assert info.value.code is ErrorCode.MALFORMED


def test_params_get_defaults() -> None:
    assert validate_params("mean_heart_rate", {}) == {"window_days": 30}
    assert validate_params("mean_heart_rate", {"window_days": np.int64(3650)}) == {"window_days": 3650}


@pytest.mark.parametrize(
    ("group_field", "edges"),
    [
        ("age", [12.0]),
        ("age", []),
        ("age", [12, 50, 25]),
        ("age", [12, 12, 25]),
        ("age", [12, math.nan, 25]),
        ("age", None),
        (None, [12, 25]),
    ],
)
def test_bad_edges_are_malformed(group_field: str | None, edges: list[float] | None) -> None:
    with pytest.raises(DispersError) as info:
        _contributions(DocumentStore(), [], group_field=group_field, edges=edges)
    assert info.value.code is ErrorCode.MALFORMED


def _bucket_loop(values: list[float], edges: list[float]) -> list[int]:
    out = []
    for v in values:
        group = -1
        for i in range(len(edges) - 1):
            if edges[i] <= v < edges[i + 1]:
                group = i
        out.append(group)
    return out


_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(
    values=st.lists(st.one_of(_finite, st.just(math.nan), st.integers(-200, 200).map(float))),
    edges=st.lists(st.integers(-200, 200).map(float) | _finite, min_size=2, max_size=8, unique=True),
)
def test_bucketize_matches_a_plain_loop(values: list[float], edges: list[float]) -> None:
    edges = sorted(edges)
    assert bucketize(values, edges).tolist() == _bucket_loop(values, edges)


def _concept_store() -> DocumentStore:
    store = DocumentStore()
    births = [
        date(2001, 11, 1),  # 25 on as_of: 25-50
        date(2001, 11, 2),  # 24: 12-25
        date(2014, 11, 1),  # 12: 12-25
        AS_OF,  # 0: 0-12
        date(1926, 11, 2),  # 99: 50-100
        date(1926, 11, 1),  # 100: 100-150
        date(1876, 11, 1),  # 150: no bracket
    ]
    ids = [f"c{k}" for k in range(len(births))]
    sexes = ["F", "M", "F", "M", "F", "M", "F"]
    store.add_instances(ids, np.array([epoch_day(d) for d in births]), sexes, np.ones(len(ids)))
    store.add_heart_rates(
        ["c0", "c2", "c3"],
        np.array([epoch_day(AS_OF), epoch_day(AS_OF - timedelta(days=400)), epoch_day(AS_OF) + 1]),
        np.array([70.0, 80.0, 90.0]),
    )
    return store


def test_derive_concepts_on_hand_made_instances() -> None:
    store = _concept_store()
    concepts = derive_concepts(store, ["c6", "c0", "c1", "c2", "c3", "c4", "c5"], AS_OF)
    assert concepts == [
        ["sex:F"],
        ["age:25-50", "sex:F", "has:heart_rate"],
        ["age:12-25", "sex:M"],
        ["age:12-25", "sex:F", "has:heart_rate"],
        ["age:0-12", "sex:M"],  # its only measurement is dated after as_of
        ["age:50-100", "sex:F"],
        ["age:100-150", "sex:M"],
    ]
    for row in concepts:
        for concept in row:
            validate_concept(concept)
    assert AGE_CONCEPTS == ("age:0-12", "age:12-25", "age:25-50", "age:50-100", "age:100-150")
    assert derive_concepts(store, [], AS_OF) == []
    with pytest.raises(DispersError) as info:
        derive_concepts(store, ["c0", "nobody"], AS_OF)
    assert info.value.code is ErrorCode.NOT_FOUND and "nobody" not in info.value.message


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "age",
        "Age:12-25",
        "age:",
        ":12",
        "age:12 25",
        "age:12-25\n",
        "a1:x",
        "age:12:25",
        "x:" + "a" * 63,
        "secret:café",
    ],
)
def test_validate_concept_rejects_without_echo(bad: str) -> None:
    with pytest.raises(DispersError) as info:
        validate_concept(bad)
    assert info.value.code is ErrorCode.MALFORMED
    assert info.value.message == "concept does not match namespace:value"


def test_concept_pattern_accepts() -> None:
    for good in ("age:12-25", "sex:F", "has:heart_rate", "geo_zone:FR.75", "x:" + "a" * 62):
        validate_concept(good)
        assert CONCEPT_PATTERN.match(good)
    with pytest.raises(DispersError):
        validate_concept(12)  # type: ignore[arg-type]
