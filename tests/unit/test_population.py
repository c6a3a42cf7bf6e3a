"""Tests of the synthetic population, the document store and the ground-truth reference."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.simulation.ground_truth import mean_heart_rate_by_age, targeted_count
from dispers.simulation.population import Population, PopulationSpec, generate
from dispers.state.documents import DocumentStore, epoch_day

AS_OF = date(2026, 11, 1)
SMALL = PopulationSpec(n_instances=500, seed=11)


def _assert_same(a: Population, b: Population) -> None:
    assert a.instance_ids == b.instance_ids
    for field in ("birth_days", "female", "consent", "hr_owner", "hr_day", "hr_bpm"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def _hand_made(birth_dates: list[date], measurements: list[tuple[int, date, float]]) -> Population:
    """A population with given birth dates (all consenting) and (owner, day, bpm) rows."""
    n = len(birth_dates)
    return Population(
        instance_ids=[f"h-{k}" for k in range(n)],
        birth_days=np.array([epoch_day(d) for d in birth_dates], dtype=np.int64),
        female=np.zeros(n, dtype=bool),
        consent=np.ones(n, dtype=bool),
        hr_owner=np.array([m[0] for m in measurements], dtype=np.int64),
        hr_day=np.array([epoch_day(m[1]) for m in measurements], dtype=np.int64),
        hr_bpm=np.array([m[2] for m in measurements], dtype=np.float64),
    )


def test_generation_is_deterministic() -> None:
    _assert_same(generate(SMALL), generate(SMALL))
    other = generate(replace(SMALL, seed=12))
    assert not np.array_equal(other.birth_days, generate(SMALL).birth_days)


def test_generated_values_are_plausible() -> None:
    spec = PopulationSpec(n_instances=3_000, seed=3)
    pop = generate(spec)
    assert pop.instance_ids[0] == "pc-1-i0000000"
    assert len(set(pop.instance_ids)) == spec.n_instances
    ages = pop.ages_at(spec.as_of)
    assert ages.min() >= 4 and ages.max() <= 95
    assert 0.9 < pop.consent.mean() < 1.0
    assert 0.4 < pop.female.mean() < 0.6
    assert pop.hr_bpm.min() >= 35.0 and pop.hr_bpm.max() <= 200.0
    end = epoch_day(spec.as_of)
    assert pop.hr_day.max() <= end and pop.hr_day.min() > end - spec.history_days
    # About 3 measurements per 10 days, and some people with none in the last 30 days.
    per_person = len(pop.hr_owner) / spec.n_instances
    assert 0.2 * spec.history_days < per_person < 0.4 * spec.history_days
    recent = np.bincount(pop.hr_owner[pop.hr_day > end - 30], minlength=spec.n_instances)
    assert 0 < (recent == 0).sum() < spec.n_instances // 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_instances": 0}, "n_instances"),
        ({"decline_rate": 1.0}, "decline_rate"),
        ({"decline_rate": -0.1}, "decline_rate"),
        ({"history_days": 0}, "history_days"),
    ],
)
def test_spec_validation_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(DispersError) as info:
        PopulationSpec(**change)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.CONFIG
    assert field in info.value.message


def test_population_rejects_mismatched_columns() -> None:
    pop = generate(replace(SMALL, n_instances=3))
    with pytest.raises(DispersError) as info:
        replace(pop, consent=pop.consent[:2])
    assert info.value.code is ErrorCode.MALFORMED


def test_ages_at_is_calendar_age() -> None:
    pop = _hand_made(
        [
            date(2001, 11, 1),  # 25th birthday on as_of
            date(2001, 11, 2),  # 25th birthday tomorrow
            date(2001, 10, 31),
            date(2000, 2, 29),  # leap-day birthday
            AS_OF,  # born today
        ],
        [],
    )
    np.testing.assert_array_equal(pop.ages_at(AS_OF), [25, 24, 25, 26, 0])
    np.testing.assert_array_equal(pop.ages_at(date(2026, 2, 28))[3], 25)
    np.testing.assert_array_equal(pop.ages_at(date(2026, 3, 1))[3], 26)


@pytest.mark.parametrize("on_disk", [False, True])
def test_write_and_read_back(tmp_path: Path, on_disk: bool) -> None:
    pop = generate(SMALL)
    path = tmp_path / "docs.sqlite" if on_disk else ":memory:"
    with DocumentStore(path) as store:
        pop.write(store)
        assert store.count() == SMALL.n_instances
        assert store.instance_ids() == sorted(pop.instance_ids)

        order = np.random.default_rng(0).permutation(SMALL.n_instances)
        ids = [pop.instance_ids[k] for k in order]
        birth, female, consent = store.identity(ids)
        np.testing.assert_array_equal(birth, pop.birth_days[order])
        np.testing.assert_array_equal(female, pop.female[order])
        np.testing.assert_array_equal(consent, pop.consent[order])

        end = epoch_day(SMALL.as_of)
        count, mean = store.heart_rate_summary(ids, end - 30, end)
        for pos, k in enumerate(order[:50].tolist()):
            mine = (pop.hr_owner == k) & (pop.hr_day > end - 30) & (pop.hr_day <= end)
            assert count[pos] == mine.sum()
            if mine.any():
                assert mean[pos] == pytest.approx(pop.hr_bpm[mine].mean(), abs=1e-9)
            else:
                assert math.isnan(mean[pos])
    if on_disk:
        with DocumentStore(path) as reopened:
            assert reopened.count() == SMALL.n_instances


def test_store_edge_cases() -> None:
    store = DocumentStore()
    store.add_instances(["a", "b"], np.array([0, 1]), ["F", "M"], np.array([True, False]))
    birth, female, consent = store.identity([])
    assert birth.shape == female.shape == consent.shape == (0,)
    count, mean = store.heart_rate_summary(["b", "a", "b"], 0, 10)
    np.testing.assert_array_equal(count, [0, 0, 0])
    assert np.isnan(mean).all()
    store.add_heart_rates(["a", "a", "a"], np.array([1, 2, 3]), np.array([60.0, 70.0, 80.0]))
    count, mean = store.heart_rate_summary(["b", "a"], 1, 3)  # day 1 is outside (1, 3]
    np.testing.assert_array_equal(count, [0, 2])
    assert mean[1] == 75.0

    with pytest.raises(DispersError) as info:
        store.identity(["a", "secret-person", "other-secret"])
    assert info.value.code is ErrorCode.NOT_FOUND
    assert "2 instance ids" in info.value.message and "secret" not in str(info.value)

    with pytest.raises(DispersError) as info:  # duplicate id: nothing of the batch is written
        store.add_instances(["c", "a"], np.array([0, 0]), ["F", "F"], np.array([1, 1]))
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    assert store.count() == 2
    with pytest.raises(DispersError) as info:
        store.add_instances(["c"], np.array([0]), ["X"], np.array([1]))
    assert info.value.code is ErrorCode.MALFORMED
    with pytest.raises(DispersError) as info:
        store.add_heart_rates(["a"], np.array([1, 2]), np.array([60.0]))
    assert info.value.code is ErrorCode.MALFORMED


def test_summary_of_ten_thousand_instances_is_fast() -> None:
    spec = PopulationSpec()
    pop = generate(spec)
    store = DocumentStore()
    pop.write(store)
    ids = store.instance_ids()
    end = epoch_day(spec.as_of)
    count, _ = store.heart_rate_summary(ids, end - 30, end)
    store.identity(ids)
    assert len(pop.hr_owner) > 200_000 and len(count) == 10_000


def test_ground_truth_on_hand_made_population() -> None:
    day = AS_OF
    pop = _hand_made(
        [
            date(2001, 11, 1),  # 25 today: bracket 25-50
            date(2001, 11, 2),  # 24: bracket 12-25
            date(1990, 1, 1),  # 36: 25-50
            date(1950, 1, 1),  # 76: 50-100, no recent measurement
            date(2020, 1, 1),  # 6: outside every bracket
        ],
        [
            (0, day, 60.0),
            (0, day - timedelta(days=29), 70.0),
            (0, day - timedelta(days=30), 500.0),  # just outside the window
            (1, day, 80.0),
            (2, day - timedelta(days=1), 90.0),
            (3, day - timedelta(days=40), 65.0),
            (4, day, 99.0),
        ],
    )
    truth = mean_heart_rate_by_age(pop, edges=[12, 25, 50, 100], window_days=30, as_of=AS_OF)
    assert list(truth) == ["12-25", "25-50", "50-100"]
    assert truth["12-25"].count == 1 and truth["12-25"].mean == 80.0
    assert math.isnan(truth["12-25"].var)
    g = truth["25-50"]
    assert (g.count, g.sum, g.mean, g.min, g.max) == (2, 155.0, 77.5, 65.0, 90.0)
    assert g.var == pytest.approx(312.5) and g.std == pytest.approx(math.sqrt(312.5))
    empty = truth["50-100"]
    assert (empty.count, empty.sum) == (0, 0.0)
    assert all(math.isnan(x) for x in (empty.mean, empty.var, empty.std, empty.min, empty.max))

    bounded = mean_heart_rate_by_age(
        pop, edges=[12, 25, 50, 100], window_days=30, as_of=AS_OF, bounds=(60.0, 80.0)
    )
    assert bounded["25-50"].count == 1 and bounded["25-50"].mean == 65.0

    pop.consent[1] = False
    assert mean_heart_rate_by_age(pop, edges=[12, 25], window_days=30, as_of=AS_OF)["12-25"].count == 0
    assert targeted_count(pop, [12, 25, 50, 100], AS_OF) == 4
    assert targeted_count(pop, [0, 12], AS_OF) == 1
    with pytest.raises(DispersError) as info:
        targeted_count(pop, [25, 12], AS_OF)
    assert info.value.code is ErrorCode.MALFORMED


def test_known_marks_which_ids_are_on_this_host() -> None:
    store = DocumentStore()
    generate(PopulationSpec(n_instances=5, seed=1)).write(store)
    ids = store.instance_ids()
    assert store.known([ids[3], "elsewhere", ids[0], ""]).tolist() == [True, False, True, False]
