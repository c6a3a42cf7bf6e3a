"""The column store answers every read as the SQLite document store does, on the same population."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.instance.functions import compute_contributions
from dispers.simulation.population import PopulationSpec, generate
from dispers.state.columns import ColumnStore
from dispers.state.documents import DocumentStore, epoch_day

AS_OF = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def stores() -> tuple[ColumnStore, DocumentStore, list[str]]:
    pop = generate(PopulationSpec(n_instances=300, seed=5, as_of=AS_OF))
    sqlite = DocumentStore(":memory:")
    pop.write(sqlite)
    columns = ColumnStore.from_population(pop)
    rng = np.random.default_rng(1)
    # A batch in shuffled order, with a repeated id.
    ids = [pop.instance_ids[i] for i in rng.permutation(pop.n_instances)[:120]]
    ids.append(ids[3])
    return columns, sqlite, ids


def test_identity_and_known(stores: tuple[ColumnStore, DocumentStore, list[str]]) -> None:
    columns, sqlite, ids = stores
    for a, b in zip(columns.identity(ids), sqlite.identity(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    asked = [*ids[:5], "nobody", "x" * 200, "pc-1-i9999999", "nöbody", ""]
    np.testing.assert_array_equal(columns.known(asked), sqlite.known(asked))
    assert columns.instance_ids() == sqlite.instance_ids()
    with pytest.raises(DispersError) as err:
        columns.identity(asked)
    assert err.value.code is ErrorCode.NOT_FOUND and "nobody" not in err.value.message


@pytest.mark.parametrize("kind", ["heart_rate", "steps", "sleep_hours", "weight_kg"])
def test_measurement_reads(stores: tuple[ColumnStore, DocumentStore, list[str]], kind: str) -> None:
    columns, sqlite, ids = stores
    end = epoch_day(AS_OF)
    for start in (end - 30, end - 7, end - 1000):
        ca, sa = (
            columns.measurement_totals(kind, ids, start, end),
            sqlite.measurement_totals(kind, ids, start, end),
        )
        np.testing.assert_array_equal(ca[0], sa[0])
        np.testing.assert_allclose(ca[1], sa[1], rtol=1e-12)
        cs, ss = (
            columns.measurement_summary(kind, ids, start, end),
            sqlite.measurement_summary(kind, ids, start, end),
        )
        np.testing.assert_array_equal(cs.count, ss.count)
        np.testing.assert_array_equal(cs.latest_day, ss.latest_day)
        np.testing.assert_allclose(cs.latest, ss.latest, rtol=1e-12)


def test_contributions_and_subscribed(stores: tuple[ColumnStore, DocumentStore, list[str]]) -> None:
    columns, sqlite, ids = stores
    args = {"function": "mean_heart_rate", "params": {"window_days": 30}, "as_of": AS_OF,
            "group_field": "age", "edges": [12, 25, 50, 100]}  # fmt: skip
    a, b = compute_contributions(columns, ids, **args), compute_contributions(sqlite, ids, **args)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.ok, b.ok)
    np.testing.assert_array_equal(a.groups, b.groups)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-12)
    assert not columns.subscribed(ids).any()
    columns.set_subscribed(ids[:10], True)
    assert columns.subscribed(ids).sum() == 10 + (ids[3] in ids[:10])
    with pytest.raises(DispersError):
        columns.set_subscribed(["nobody"], True)


def test_measurements_in_any_row_order(stores: tuple[ColumnStore, DocumentStore, list[str]]) -> None:
    columns, _, ids = stores
    pop = generate(PopulationSpec(n_instances=300, seed=5, as_of=AS_OF))
    order = np.random.default_rng(2).permutation(len(pop.hr_owner))
    shuffled = ColumnStore(
        pop.instance_ids, pop.birth_days, pop.female, pop.consent,
        {"heart_rate": (pop.hr_owner[order].astype(np.int32), pop.hr_day[order], pop.hr_bpm[order])},
    )  # fmt: skip
    end = epoch_day(AS_OF)
    a = shuffled.measurement_summary("heart_rate", ids, end - 30, end)
    b = columns.measurement_summary("heart_rate", ids, end - 30, end)
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_allclose(a.sum, b.sum, rtol=1e-12)
    np.testing.assert_allclose(a.latest, b.latest, rtol=1e-12)
    with pytest.raises(DispersError):
        shuffled.measurement_totals("steps", ids, end - 30, end)  # a kind it does not keep
