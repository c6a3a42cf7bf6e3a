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
from dispers.simulation.population import (
    HR_MODEL,
    MEASURED_KINDS,
    Population,
    PopulationSpec,
    Series,
    concat,
    generate,
)
from dispers.state.documents import MEASUREMENT_KINDS, DocumentStore, epoch_day

AS_OF = date(2026, 11, 1)
SMALL = PopulationSpec(n_instances=500, seed=11)


def _assert_same(a: Population, b: Population) -> None:
    assert a.instance_ids == b.instance_ids
    for field in ("birth_days", "female", "consent", "hr_owner", "hr_day", "hr_bpm"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for kind in MEASURED_KINDS:
        for column in ("owner", "day", "value"):
            np.testing.assert_array_equal(getattr(a.series(kind), column), getattr(b.series(kind), column))
    assert set(a.levels) == set(b.levels)
    for kind, level in a.levels.items():
        np.testing.assert_array_equal(level, b.levels[kind])


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


def test_generated_measurements_are_believable() -> None:
    spec = PopulationSpec(n_instances=5_000, seed=3)
    pop = generate(spec)
    ages = pop.ages_at(spec.as_of)
    end = epoch_day(spec.as_of)
    for kind in MEASURED_KINDS:
        series = pop.series(kind)
        assert len(series) > spec.n_instances  # several per recording person
        bounds = MEASUREMENT_KINDS[kind]
        assert series.value.min() >= bounds.lo and series.value.max() <= bounds.hi
        assert series.day.max() <= end and series.day.min() > end - spec.history_days
        if kind != "heart_rate":  # daily kinds: at most one value a day
            keys = series.owner * spec.history_days + (end - series.day)
            assert len(np.unique(keys)) == len(keys)
        recording = np.bincount(series.owner, minlength=spec.n_instances) > 0
        assert 0.3 < recording.mean() < 0.99  # not everyone records every kind

    def mean_near(kind: str, age: int) -> float:
        series = pop.series(kind)
        near = np.abs(ages[series.owner] - age) <= 3
        return float(series.value[near].mean())

    # Steps a day fall with age, about 9,000 at 30 and 5,000 at 80.
    assert mean_near("steps", 30) == pytest.approx(9_000, rel=0.1)
    assert mean_near("steps", 80) == pytest.approx(5_000, rel=0.1)
    # Sleep about 7.2 +- 0.8 hours, slightly less with age.
    sleep = pop.sleep_hours.value
    assert sleep.mean() == pytest.approx(7.2, abs=0.15) and sleep.std() == pytest.approx(0.8, abs=0.1)
    assert mean_near("sleep_hours", 20) > mean_near("sleep_hours", 80)
    # Adult weight depends on sex; children weigh less.
    weight = pop.weight_kg
    adult = (ages[weight.owner] >= 25) & (ages[weight.owner] < 60)
    female = pop.female[weight.owner]
    assert weight.value[adult & female].mean() == pytest.approx(68, abs=2.5)
    assert weight.value[adult & ~female].mean() == pytest.approx(82, abs=2.5)
    assert mean_near("weight_kg", 7) < 30
    # People who walk more weigh a little less (adults, levels).
    grown = ages >= 25
    assert np.corrcoef(pop.levels["steps"][grown], pop.levels["weight_kg"][grown])[0, 1] < -0.05

    # Mean heart rate per adult age bracket stays plausible, and follows the model's slopes.
    truth = mean_heart_rate_by_age(pop, edges=[12, 25, 50, 100], window_days=30, as_of=spec.as_of)
    for group in truth.values():
        assert 65.0 < group.mean < 75.0 and 4.0 < group.std < 9.0
    heavier = pop.levels["weight_kg"] > 90
    lighter = (pop.levels["weight_kg"] > 60) & (pop.levels["weight_kg"] < 75)
    assert pop.levels["heart_rate"][heavier].mean() - pop.levels["heart_rate"][lighter].mean() > 4
    assert HR_MODEL["weight_kg"] > 0 > HR_MODEL["steps"]


def test_concat_keeps_every_series() -> None:
    a = generate(PopulationSpec(n_instances=20, seed=1, host="a"))
    b = generate(PopulationSpec(n_instances=30, seed=2, host="b"))
    hand = _hand_made([date(1990, 1, 1)], [(0, AS_OF, 70.0)])
    both = concat(a, b, hand)
    assert both.n_instances == 51
    for kind in MEASURED_KINDS:
        joined = both.series(kind)
        assert len(joined) == len(a.series(kind)) + len(b.series(kind)) + len(hand.series(kind))
        tail = joined.owner[len(a.series(kind)) : len(a.series(kind)) + len(b.series(kind))]
        np.testing.assert_array_equal(tail, b.series(kind).owner + 20)
    assert both.levels == {}  # the hand-made part has no levels
    assert set(concat(a, b).levels) == set(MEASURED_KINDS)


def test_population_rejects_series_outside_the_instances() -> None:
    pop = generate(replace(SMALL, n_instances=3))
    outside = Series(np.array([3]), np.array([0]), np.array([5000.0]))
    with pytest.raises(DispersError) as info:
        replace(pop, steps=outside)
    assert info.value.code is ErrorCode.MALFORMED and "steps" in info.value.message
    with pytest.raises(DispersError) as info:
        Series(np.array([0]), np.array([0, 1]), np.array([1.0]))
    assert info.value.code is ErrorCode.MALFORMED
    with pytest.raises(DispersError) as info:
        pop.series("blood_sugar")
    assert info.value.code is ErrorCode.NOT_FOUND


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
        for kind in MEASURED_KINDS:
            series = pop.series(kind)
            summary = store.measurement_summary(kind, ids, end - SMALL.history_days, end)
            np.testing.assert_array_equal(
                summary.count, np.bincount(series.owner, minlength=SMALL.n_instances)[order]
            )
            sums = np.bincount(series.owner, weights=series.value, minlength=SMALL.n_instances)
            np.testing.assert_allclose(summary.sum, sums[order], rtol=1e-12)
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
