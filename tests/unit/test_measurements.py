"""Tests of measurement kinds in the document store, the functions over them, and their ground truth."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.instance.functions import (
    FIELDS,
    FUNCTIONS,
    SEX_CODES,
    SEX_EDGES,
    compute_contributions,
    describe_fields,
    describe_functions,
    get_function,
    natural_bounds,
    validate_params,
)
from dispers.simulation.ground_truth import PARAM_DEFAULTS, local_values, stats_by_group
from dispers.simulation.population import (
    HR_MODEL,
    HR_MODEL_CENTRES,
    MEASURED_KINDS,
    Population,
    PopulationSpec,
    Series,
    generate,
)
from dispers.state.documents import MEASUREMENT_KINDS, NO_DAY, DocumentStore, epoch_day

AS_OF = date(2026, 11, 1)
END = epoch_day(AS_OF)
KINDS = tuple(MEASUREMENT_KINDS)
STATISTICS = ("mean", "latest", "count", "sum")


def _store(n: int = 4) -> tuple[DocumentStore, list[str]]:
    store = DocumentStore()
    ids = [f"m{k}" for k in range(n)]
    store.add_instances(ids, np.full(n, END - 12_000), ["F", "M"] * (n // 2) + ["F"] * (n % 2), np.ones(n))
    return store, ids


def _nothing_stored(store: DocumentStore, ids: list[str]) -> bool:
    return all(len(store.read_measurements(kind, ids)[0]) == 0 for kind in KINDS)


def _same(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9, equal_nan=True)


# --- The store ------------------------------------------------------------------------------


def test_kinds_registry() -> None:
    assert set(KINDS) == set(MEASURED_KINDS) == {"heart_rate", "steps", "sleep_hours", "weight_kg"}
    bounds = {k: (v.lo, v.hi) for k, v in MEASUREMENT_KINDS.items()}
    assert bounds == {
        "heart_rate": (20.0, 250.0),
        "steps": (0.0, 100_000.0),
        "sleep_hours": (0.0, 24.0),
        "weight_kg": (2.0, 400.0),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_per_kind(kind: str) -> None:
    store, ids = _store()
    spec = MEASUREMENT_KINDS[kind]
    rng = np.random.default_rng(1)
    owners = [ids[k] for k in (2, 0, 2, 1, 2, 0, 2)]
    days = np.array([END, END - 3, END, END - 1, END - 40, END + 2, END - 5])
    values = np.concatenate([[spec.lo, spec.hi], rng.uniform(spec.lo, spec.hi, 5)])
    store.add_measurements(kind, owners, days, values)

    pos, day, value = store.read_measurements(kind, ids)
    expected = sorted(
        (
            (ids.index(o), int(d), k, float(v))
            for k, (o, d, v) in enumerate(zip(owners, days, values, strict=True))
        ),
        key=lambda r: (r[0], r[1], r[2]),
    )
    assert pos.tolist() == [r[0] for r in expected]
    assert day.tolist() == [r[1] for r in expected]
    assert value.tolist() == [r[3] for r in expected]  # REAL keeps every float64 bit
    for other in KINDS:
        if other != kind:
            assert len(store.read_measurements(other, ids)[0]) == 0

    # The window (END - 30, END]: m2 has END (twice), END - 5; m0 END - 3; m1 END - 1; m3 nothing.
    summary = store.measurement_summary(kind, [ids[3], ids[2], ids[0], ids[1], ids[2]], END - 30, END)
    assert summary.count.tolist() == [0, 3, 1, 1, 3]
    assert summary.sum[1] == pytest.approx(values[0] + values[2] + values[6])
    assert summary.latest[1] == pytest.approx((values[0] + values[2]) / 2)  # the mean of day END
    assert summary.latest_day.tolist() == [NO_DAY, END, END - 3, END - 1, END]
    assert math.isnan(summary.latest[0]) and summary.sum[0] == 0.0 and math.isnan(summary.mean[0])
    np.testing.assert_array_equal(summary.latest[2:4], [values[1], values[3]])
    count, total = store.measurement_totals(kind, [ids[2], "unknown"], END - 30, END)
    assert count.tolist() == [3, 0] and total[0] == summary.sum[1] and total[1] == 0.0


def test_unknown_kind_is_refused_by_name() -> None:
    store, ids = _store()
    for call in (
        lambda: store.add_measurements("blood_sugar", ids[:1], [END], [5.0]),
        lambda: store.measurement_summary("blood_sugar", ids, 0, END),
        lambda: store.measurement_totals("blood_sugar", ids, 0, END),
        lambda: store.read_measurements("blood_sugar", ids),
    ):
        with pytest.raises(DispersError) as info:
            call()
        assert info.value.code is ErrorCode.NOT_FOUND and "blood_sugar" in info.value.message
    assert _nothing_stored(store, ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["below", "above", "nan", "inf", "-inf"])
def test_bad_value_names_kind_and_row(kind: str, bad: str) -> None:
    store, ids = _store()
    spec = MEASUREMENT_KINDS[kind]
    wrong = {
        "below": np.nextafter(spec.lo, -math.inf),
        "above": np.nextafter(spec.hi, math.inf),
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
    }[bad]
    values = [spec.lo, spec.hi, wrong, spec.hi]
    with pytest.raises(DispersError) as info:
        store.add_measurements(kind, ids, [END] * 4, values)
    assert info.value.code is ErrorCode.MALFORMED
    assert kind in info.value.message and "row 2" in info.value.message
    assert repr(float(wrong)) not in info.value.message  # a value is personal: never echoed
    assert _nothing_stored(store, ids)


@pytest.mark.parametrize(
    ("owners", "days", "values", "code", "named"),
    [
        (["m0", "m1", "elsewhere", "m2"], [END] * 4, [70.0] * 4, ErrorCode.NOT_FOUND, "row 2"),
        (["m0", "m1", "m1", "m2"], [END, END, END - 0.5, END], [70.0] * 4, ErrorCode.MALFORMED, "row 2"),
        (["m0", "m1", "m1", "m2"], [END, END, math.nan, END], [70.0] * 4, ErrorCode.MALFORMED, "row 2"),
        (["m0", "m1"], [END], [70.0, 70.0], ErrorCode.MALFORMED, "lengths"),
        (["m0", "m1"], [END, END], [70.0], ErrorCode.MALFORMED, "lengths"),
        (["m0", "m1"], ["today", "today"], [70.0, 70.0], ErrorCode.MALFORMED, "whole numbers"),
        (["m0", "m1"], [END, END], ["fast", "slow"], ErrorCode.MALFORMED, "numbers"),
        (["m0", "m1"], [END, END], [[70.0], [70.0]], ErrorCode.MALFORMED, "flat"),
        (["m0", 1], [END, END], [70.0, 70.0], ErrorCode.MALFORMED, "strings"),
        ("m0", [END, END], [70.0, 70.0], ErrorCode.MALFORMED, "strings"),
    ],
)
def test_bad_rows_are_refused_whole(
    owners: list[str], days: list[float], values: list[float], code: ErrorCode, named: str
) -> None:
    store, ids = _store()
    with pytest.raises(DispersError) as info:
        store.add_measurements("heart_rate", owners, days, values)
    assert info.value.code is code and named in info.value.message
    assert "elsewhere" not in info.value.message  # nor is an id
    assert _nothing_stored(store, ids)


def test_heart_rate_is_kept_as_a_view(tmp_path: Path) -> None:
    path = tmp_path / "docs.sqlite"
    with DocumentStore(path) as store:
        store.add_instances(["a"], [0], ["F"], [1])
        store.add_heart_rates(["a", "a"], [END - 1, END], [60.0, 80.0])
        store.add_measurements("steps", ["a"], [END], [4000.0])
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT instance_id, day, bpm FROM heart_rate ORDER BY day").fetchall() == [
        ("a", END - 1, 60.0),
        ("a", END, 80.0),
    ]
    # SQL written for the old table can still add and remove rows.
    conn.execute("INSERT INTO heart_rate VALUES ('a', ?, 90.0), ('a', ?, 90.0)", (END - 2, END - 2))
    conn.execute("DELETE FROM heart_rate WHERE day = ?", (END - 1,))
    conn.commit()
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("UPDATE heart_rate SET bpm = bpm + 1")
    conn.close()
    with DocumentStore(path) as store:
        _, day, value = store.read_measurements("heart_rate", ["a"])
        assert day.tolist() == [END - 2, END - 2, END] and value.tolist() == [90.0, 90.0, 80.0]
        assert store.read_measurements("steps", ["a"])[2].tolist() == [4000.0]
        with store._lock:  # as a test of the old schema did, through the connection
            store._conn.execute("DELETE FROM heart_rate WHERE instance_id = ?", ("a",))
        assert len(store.read_measurements("heart_rate", ["a"])[0]) == 0
        assert len(store.read_measurements("steps", ["a"])[0]) == 1


def test_a_store_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE instances (instance_id TEXT PRIMARY KEY, birth_date INTEGER NOT NULL,
            sex TEXT NOT NULL, consent INTEGER NOT NULL);
        CREATE TABLE heart_rate (instance_id TEXT NOT NULL, day INTEGER NOT NULL, bpm REAL NOT NULL);
        CREATE INDEX heart_rate_by_instance_day ON heart_rate (instance_id, day);
        INSERT INTO instances VALUES ('a', 0, 'F', 1), ('b', 0, 'M', 1);
        INSERT INTO heart_rate VALUES ('a', 100, 60.0), ('a', 101, 70.0), ('b', 90, 55.0);
        """
    )
    conn.commit()
    conn.close()
    for _ in range(2):  # the second open finds nothing left to migrate
        with DocumentStore(path) as store:
            count, mean = store.heart_rate_summary(["a", "b"], 0, 101)
            assert count.tolist() == [2, 1] and mean.tolist() == [65.0, 55.0]
            assert store.read_measurements("heart_rate", ["a"])[2].tolist() == [60.0, 70.0]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    kinds = dict(conn.execute("SELECT name, type FROM sqlite_master WHERE name = 'heart_rate'").fetchall())
    assert kinds == {"heart_rate": "view"}
    conn.close()


# --- The registry ---------------------------------------------------------------------------


def test_describe_functions_lists_every_kind_and_statistic() -> None:
    infos = {i.name: i for i in describe_functions()}
    expected = {f"{s}_{k}" for s in STATISTICS for k in KINDS} | {"age"}
    assert set(infos) == expected == set(FUNCTIONS)
    for name, info in infos.items():
        assert info.summary and "\n" not in info.summary
        assert info.lower <= info.upper
        assert validate_params(name, {}) == {k: p.default for k, p in info.params.items()}
        if name == "age":
            assert (info.kind, info.lower, info.upper, dict(info.params)) == (None, 0.0, 150.0, {})
            continue
        statistic, _, kind = name.partition("_")
        spec = MEASUREMENT_KINDS[kind]
        assert (info.kind, info.statistic) == (kind, statistic)
        if statistic in ("mean", "latest"):
            assert (info.lower, info.upper, info.unit) == (spec.lo, spec.hi, spec.unit)
            assert info.bounds({next(iter(info.params)): 7}) == (spec.lo, spec.hi)
        elif statistic == "count":
            assert (info.lower, info.upper) == (0.0, 30.0 * spec.max_per_day)
            assert info.bounds({"window_days": 7}) == (0.0, 7.0 * spec.max_per_day)
        else:
            assert info.upper == 30.0 * spec.max_per_day * spec.hi
            assert natural_bounds(name, {"window_days": 1})[1] == spec.max_per_day * spec.hi
    assert set(infos["latest_weight_kg"].params) == {"max_age_days"}
    assert set(infos["sum_steps"].params) == {"window_days"}
    assert infos["mean_heart_rate"].bounds() == (20.0, 250.0)
    with pytest.raises(DispersError) as error:
        infos["mean_steps"].bounds({"window_days": 0})
    assert error.value.code is ErrorCode.MALFORMED and "window_days" in error.value.message


def test_describe_fields_documents_sex_categories() -> None:
    fields = {f.name: f for f in describe_fields()}
    assert set(fields) == set(FIELDS) == {"age", "sex"}
    assert dict(fields["sex"].categories) == dict(SEX_CODES) == {"F": 0, "M": 1}
    assert fields["age"].unit == "years" and not fields["age"].categories
    assert SEX_EDGES == (0.0, 1.0, 2.0)


def test_ground_truth_defaults_are_the_registry_defaults() -> None:
    for info in describe_functions():
        statistic = "age" if info.name == "age" else info.statistic
        assert validate_params(info.name, {}) == PARAM_DEFAULTS[statistic]


@pytest.fixture(scope="module")
def seeded() -> tuple[Population, DocumentStore]:
    pop = generate(PopulationSpec(n_instances=500, seed=21, as_of=AS_OF))
    store = DocumentStore()
    pop.write(store)
    return pop, store


def _other_params(name: str) -> list[dict[str, object]]:
    if name == "age":
        return [{}]
    if name.startswith("latest_"):
        return [{}, {"max_age_days": 0}, {"max_age_days": 7}, {"max_age_days": 365}]
    return [{}, {"window_days": 1}, {"window_days": 7}, {"window_days": 90}]


@pytest.mark.parametrize("as_of", [AS_OF, AS_OF - timedelta(days=20)])
def test_every_function_equals_ground_truth(seeded: tuple[Population, DocumentStore], as_of: date) -> None:
    pop, store = seeded
    order = np.random.default_rng(3).permutation(pop.n_instances)
    ids = [pop.instance_ids[k] for k in order]
    for info in describe_functions():
        for params in _other_params(info.name):
            values, has = get_function(info.name)(store, ids, params, as_of)
            truth, truth_has = local_values(pop, info.name, params, as_of)
            np.testing.assert_array_equal(has, truth_has[order], err_msg=f"{info.name} {params}")
            _same(values, truth[order])
            lo, hi = info.bounds(params)
            assert np.all((values[has] >= lo) & (values[has] <= hi)), info.name
            assert np.isnan(values[~has]).all()
            if info.statistic != "count":  # a count exists for everyone; others need data
                assert 0 < has.sum() < len(ids) or info.name == "age"


@pytest.mark.parametrize(
    "function", ["mean_steps", "latest_weight_kg", "count_sleep_hours", "sum_steps", "age"]
)
@pytest.mark.parametrize(
    ("field", "edges"), [("sex", SEX_EDGES), ("age", (12.0, 25.0, 50.0, 100.0)), (None, None)]
)
def test_grouped_contributions_equal_stats_by_group(
    seeded: tuple[Population, DocumentStore],
    function: str,
    field: str | None,
    edges: tuple[float, ...] | None,
) -> None:
    pop, store = seeded
    local = compute_contributions(
        store, pop.instance_ids, function=function, params={}, as_of=AS_OF, group_field=field, edges=edges
    )
    truth = stats_by_group(pop, function, {}, AS_OF, group_field=field, edges=edges)
    assert len(truth) == (1 if edges is None else len(edges) - 1)
    for g, t in enumerate(truth.values()):
        mine = local.values[local.ok & (local.groups == g)]
        assert len(mine) == t.count > 0
        assert mine.mean() == pytest.approx(t.mean, rel=1e-12)
        assert mine.min() == t.min and mine.max() == t.max
        if t.count > 1:
            assert np.std(mine, ddof=1) == pytest.approx(t.std, rel=1e-9, abs=1e-12)


def test_age_function() -> None:
    store, ids = _store(3)
    store.add_instances(["baby", "unborn"], [END, END + 1], ["F", "M"], [1, 1])
    values, has = get_function("age")(store, [*ids, "baby", "unborn"], {}, AS_OF)
    assert has.tolist() == [True, True, True, True, False]
    assert values[3] == 0.0 and math.isnan(values[4])
    assert values[0] == 32.0  # 12,000 days before as_of
    with pytest.raises(DispersError) as info:
        get_function("age")(store, ids, {"window_days": 3}, AS_OF)
    assert info.value.code is ErrorCode.MALFORMED


# --- Windows and the latest value, on small random series -----------------------------------


def _series_population(kind: str, n: int, rows: list[tuple[int, int, float]]) -> Population:
    owner = np.array([r[0] for r in rows], dtype=np.int64)
    day = np.array([END + r[1] for r in rows], dtype=np.int64)
    value = np.array([r[2] for r in rows], dtype=np.float64)
    empty = Series.empty()
    series = Series(owner, day, value)
    pop = Population(
        instance_ids=[f"p{k}" for k in range(n)],
        birth_days=np.full(n, END - 10_000, dtype=np.int64),
        female=np.zeros(n, dtype=bool),
        consent=np.ones(n, dtype=bool),
        hr_owner=empty.owner,
        hr_day=empty.day,
        hr_bpm=empty.value,
    )
    if kind == "heart_rate":
        return replace(pop, hr_owner=owner, hr_day=day, hr_bpm=value)
    if kind == "steps":
        return replace(pop, steps=series)
    if kind == "sleep_hours":
        return replace(pop, sleep_hours=series)
    return replace(pop, weight_kg=series)


@st.composite
def _small_series(draw: st.DrawFn) -> tuple[str, int, list[tuple[int, int, float]]]:
    kind = draw(st.sampled_from(KINDS))
    spec = MEASUREMENT_KINDS[kind]
    n = draw(st.integers(1, 4))
    value = st.one_of(
        st.sampled_from([spec.lo, spec.hi]),
        st.floats(spec.lo, spec.hi, allow_nan=False),
        st.integers(int(spec.lo), int(min(spec.hi, 1000))).map(float),
    )
    # Days around as_of, several a day allowed, some after as_of (never counted).
    row = st.tuples(st.integers(0, n - 1), st.integers(-12, 3), value)
    return kind, n, draw(st.lists(row, max_size=25))


@settings(max_examples=150)
@given(case=_small_series(), window=st.integers(1, 14), max_age=st.integers(0, 14), shift=st.integers(-3, 3))
def test_windows_and_latest_match_ground_truth(
    case: tuple[str, int, list[tuple[int, int, float]]], window: int, max_age: int, shift: int
) -> None:
    kind, n, rows = case
    pop = _series_population(kind, n, rows)
    store = DocumentStore()
    pop.write(store)
    as_of = AS_OF + timedelta(days=shift)
    for statistic in STATISTICS:
        name = f"{statistic}_{kind}"
        params: dict[str, object] = (
            {"max_age_days": max_age} if statistic == "latest" else {"window_days": window}
        )
        values, has = get_function(name)(store, pop.instance_ids, params, as_of)
        truth, truth_has = local_values(pop, name, params, as_of)
        np.testing.assert_array_equal(has, truth_has)
        _same(values, truth)

    # The definitions, restated row by row for the latest value.
    end = epoch_day(as_of)
    values, has = get_function(f"latest_{kind}")(store, pop.instance_ids, {"max_age_days": max_age}, as_of)
    for k in range(n):
        mine = [(d, v) for o, d, v in rows if o == k and end - max_age <= END + d <= end]
        assert has[k] == bool(mine)
        if mine:
            last = max(d for d, _ in mine)
            assert values[k] == pytest.approx(np.mean([v for d, v in mine if d == last]), rel=1e-12)


# --- The population's known relation --------------------------------------------------------


def test_regression_recovers_the_heart_rate_model() -> None:
    """OLS of mean heart rate (30 days) on mean weight and steps (90 days) finds HR_MODEL."""
    spec = PopulationSpec(n_instances=5_000, seed=2024, as_of=AS_OF)
    pop = generate(spec)
    store = DocumentStore()
    pop.write(store)
    ids = pop.instance_ids
    hr, has_hr = get_function("mean_heart_rate")(store, ids, {"window_days": 30}, AS_OF)
    weight, has_w = get_function("mean_weight_kg")(store, ids, {"window_days": 90}, AS_OF)
    steps, has_s = get_function("mean_steps")(store, ids, {"window_days": 90}, AS_OF)
    use = has_hr & has_w & has_s
    assert use.sum() > 1_500
    x = np.column_stack(
        [
            np.ones(int(use.sum())),
            weight[use] - HR_MODEL_CENTRES["weight_kg"],
            steps[use] - HR_MODEL_CENTRES["steps"],
        ]
    )
    y = hr[use]
    beta, rss, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    assert rank == 3
    sigma2 = float(rss[0]) / (len(y) - 3)
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
    truth = np.array([HR_MODEL["intercept"], HR_MODEL["weight_kg"], HR_MODEL["steps"]])
    z = (beta - truth) / se
    assert np.all(np.abs(z) < 3), (beta, se, z)
    assert np.all(se < np.abs(truth) / 5)  # and the data pin them down

    # The levels themselves follow the model exactly, with the stated sigma.
    levels = pop.levels
    linear = (
        HR_MODEL["intercept"]
        + HR_MODEL["weight_kg"] * (levels["weight_kg"] - HR_MODEL_CENTRES["weight_kg"])
        + HR_MODEL["steps"] * (levels["steps"] - HR_MODEL_CENTRES["steps"])
    )
    residual = levels["heart_rate"] - linear
    assert abs(residual.mean()) < 0.15
    assert np.std(residual) == pytest.approx(HR_MODEL["sigma"], rel=0.05)
