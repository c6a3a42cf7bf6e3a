"""Tests of mergeable partial aggregates (dispers.protocol.aggregation.partial) against numpy."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import new_query_id
from dispers.core.spec import HISTOGRAM_STATS, MULTI_STATS, STATS, AggregateSpec
from dispers.protocol.aggregation.partial import DROP_REASONS, Partial, merged

MOMENT_STATS = tuple(s for s in STATS if s not in HISTOGRAM_STATS + MULTI_STATS)


def _json_round_trip(p: Partial) -> Partial:
    return Partial.from_obj(json.loads(json.dumps(p.to_obj())), p.n_groups)


def _truth(groups: list[int], values: list[float], n_groups: int) -> list[dict[str, Any]]:
    """Per group statistics computed by numpy on the whole data, independently of Partial."""
    g = np.asarray(groups, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    out = []
    for i in range(n_groups):
        x = v[g == i]
        n = len(x)
        out.append(
            {
                "count": n,
                "sum": float(np.sum(x)),
                "mean": float(np.mean(x)) if n else None,
                "var": float(np.var(x, ddof=1)) if n >= 2 else None,
                "std": float(np.std(x, ddof=1)) if n >= 2 else None,
                "min": float(np.min(x)) if n else None,
                "max": float(np.max(x)) if n else None,
            }
        )
    return out


def _assert_stats(got: dict[str, Any], want: dict[str, Any], scale: float) -> None:
    assert got["count"] == want["count"]
    tolerances = {"sum": scale * max(want["count"], 1), "mean": scale, "std": scale, "var": scale**2}
    for stat in ("mean", "var", "std", "sum"):
        if want[stat] is None:
            assert got[stat] is None, stat
        else:
            assert got[stat] is not None, stat
            assert math.isclose(got[stat], want[stat], rel_tol=1e-9, abs_tol=1e-9 * tolerances[stat]), (
                stat,
                got[stat],
                want[stat],
            )
    # min and max are exact operations: no tolerance
    assert got["min"] == want["min"]
    assert got["max"] == want["max"]


VALUES = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.integers(30, 220).map(float),  # heart-rate like, with many ties
)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[int, list[int], list[float]]:
    n_groups = draw(st.integers(1, 5))
    rows = draw(st.lists(st.tuples(st.integers(0, n_groups - 1), VALUES), max_size=60))
    offset = draw(st.sampled_from([0.0, 0.0, 1e3, -1e5]))  # a large common mean tests stability
    return n_groups, [g for g, _ in rows], [v + offset for _, v in rows]


@settings(max_examples=200, deadline=None)
@given(datasets(), st.data())
def test_any_tree_of_merges_equals_numpy_on_the_whole_data(
    dataset: tuple[int, list[int], list[float]], data: st.DataObject
) -> None:
    n_groups, groups, values = dataset
    n = len(values)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=8), label="cuts"))
    bounds = [0, *cuts, n]
    nodes: list[Partial] = []
    total_dropped = total_declined = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        if data.draw(st.booleans(), label="via add"):
            p = Partial.empty(n_groups)
            p.add(groups[a:b], values[a:b])
        else:
            p = Partial.of(n_groups, groups[a:b], values[a:b])
        dropped = data.draw(st.integers(0, 3), label="dropped")
        p.drop("out_of_bounds", dropped)
        total_dropped += dropped
        declines = data.draw(st.integers(0, 3), label="declined")
        p.decline(declines)
        total_declined += declines
        nodes.append(p)
    # merge in a random binary tree shape, sending some nodes through JSON on the way
    while len(nodes) > 1:
        i = data.draw(st.integers(0, len(nodes) - 1), label="left")
        left = nodes.pop(i)
        j = data.draw(st.integers(0, len(nodes) - 1), label="right")
        right = nodes.pop(j)
        if data.draw(st.booleans(), label="json left"):
            left = _json_round_trip(left)
        if data.draw(st.booleans(), label="json right"):
            right = _json_round_trip(right)
        if data.draw(st.booleans(), label="in place"):
            left.merge(right)
            nodes.append(left)
        else:
            nodes.append(merged([left, right], n_groups))
    result = nodes[0]
    if data.draw(st.booleans(), label="json root"):
        result = _json_round_trip(result)

    scale = max([1.0, *(abs(v) for v in values)])
    for i, want in enumerate(_truth(groups, values, n_groups)):
        _assert_stats(result.stats(i), want, scale)
    assert int(result.count.sum()) == n
    assert result.dropped == ({"out_of_bounds": total_dropped} if total_dropped else {})
    assert result.declined == total_declined
    assert result.items == n + total_dropped + total_declined


def test_merged_accepts_a_mapping_of_children() -> None:
    a = Partial.of(2, [0, 1, 1], [1.0, 2.0, 4.0])
    b = Partial.of(2, [0], [5.0])
    out = merged({"da-1": a, "da-2": b}, 2)
    assert out.stats(0)["count"] == 2 and out.stats(0)["mean"] == 3.0
    assert out.stats(1)["var"] == 2.0  # values 2, 4: mean 3, sample var 2


def test_empty_groups_have_no_statistics() -> None:
    p = Partial.of(3, [1, 1], [10.0, 20.0])
    for target in (p, _json_round_trip(p), Partial.empty(3)):
        for i in (0, 2):
            assert target.stats(i) == {
                "count": 0, "sum": 0.0, "mean": None, "var": None, "std": None,
                "min": None, "max": None,
            }  # fmt: skip
    obj = p.to_obj()
    assert obj["min"] == [None, [10.0], None]
    assert obj["max"] == [None, [20.0], None]
    assert p.stats(1)["mean"] == 15.0


def test_merging_an_empty_partial_changes_nothing() -> None:
    p = Partial.of(2, [0, 0, 1], [1.0, 3.0, 7.0])
    before = p.to_obj()
    p.merge(Partial.empty(2))
    assert p.to_obj() == before
    e = Partial.empty(2)
    e.merge(Partial.of(2, [0, 0, 1], [1.0, 3.0, 7.0]))
    assert e.to_obj() == before


def test_single_value_has_no_variance() -> None:
    p = Partial.of(1, [0], [42.0])
    assert p.stats(0)["count"] == 1
    assert p.stats(0)["var"] is None and p.stats(0)["std"] is None
    assert p.stats(0)["min"] == p.stats(0)["max"] == p.stats(0)["mean"] == 42.0


def test_partials_of_different_group_counts_do_not_merge() -> None:
    with pytest.raises(ValueError):
        Partial.empty(2).merge(Partial.empty(3))


@pytest.mark.parametrize(
    ("groups", "values"),
    [([0, 3], [1.0, 2.0]), ([-1], [1.0]), ([0, 1], [1.0]), ([[0]], [[1.0]])],
)
def test_batches_with_bad_groups_are_refused(groups: Any, values: Any) -> None:
    with pytest.raises(ValueError):
        Partial.of(3, groups, values)


# --- release ------------------------------------------------------------------------------------

LABELS = ("12-25", "25-50", "50-100", "100-120")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 12), min_size=4, max_size=4),
    st.integers(2, 8),
    st.lists(st.sampled_from(MOMENT_STATS), min_size=1, max_size=len(MOMENT_STATS), unique=True),
    st.randoms(use_true_random=False),
)
def test_release_suppresses_small_groups_and_reports_only_requested_stats(
    counts: list[int], k: int, stats: list[str], rnd: Any
) -> None:
    groups = [i for i, c in enumerate(counts) for _ in range(c)]
    values = [float(rnd.randint(30, 220)) for _ in groups]
    partial = Partial.of(len(LABELS), groups, values)
    partial.drop("out_of_bounds", 3)
    spec = AggregateSpec(new_query_id(), k, (30.0, 220.0), tuple(stats), LABELS)
    result = partial.release(spec)

    assert result.query_id == spec.query_id and result.k == k
    assert [g.label for g in result.groups] == list(LABELS)
    # Every reason is listed whatever happened, and a count under k carries no number.
    assert set(result.dropped) == set(DROP_REASONS)
    assert result.dropped["out_of_bounds"] == (3 if k <= 3 else None)
    assert all(result.dropped[r] == (0 if k <= 0 else None) for r in DROP_REASONS if r != "out_of_bounds")
    truth = _truth(groups, values, len(LABELS))
    for group, count, want in zip(result.groups, counts, truth, strict=True):
        if count < k:
            assert group.suppressed is True
            assert dict(group.values) == {}
        else:
            assert group.suppressed is False
            assert set(group.values) == set(stats)
            for stat in stats:
                if want[stat] is None:
                    assert group.values[stat] is None
                else:
                    assert math.isclose(group.values[stat], want[stat], rel_tol=1e-9, abs_tol=1e-6)


def test_release_at_exactly_k_is_not_suppressed() -> None:
    partial = Partial.of(2, [0, 0, 0, 1, 1], [60.0, 70.0, 80.0, 100.0, 120.0])
    spec = AggregateSpec(new_query_id(), 3, (30.0, 220.0), ("count", "mean"), ("a", "b"))
    result = partial.release(spec)
    assert result.group("a").suppressed is False
    assert dict(result.group("a").values) == {"count": 3, "mean": 70.0}
    assert result.group("b").suppressed is True
    assert dict(result.group("b").values) == {}


def test_release_does_not_reveal_the_count_of_a_suppressed_group() -> None:
    partial = Partial.of(2, [0] * 20 + [1], [70.0] * 20 + [150.0])  # one person in group b
    spec = AggregateSpec(new_query_id(), 10, (30.0, 220.0), ("count", "mean"), ("a", "b"))
    result = partial.release(spec)
    assert result.group("b").suppressed
    released = sum(int(g.values["count"]) for g in result.groups if not g.suppressed)
    assert result.contributions - released != 1


# --- from_obj validation ------------------------------------------------------------------------


def _valid_obj() -> dict[str, Any]:
    p = Partial.of(3, [0, 0, 1], [1.0, 2.0, 5.0])
    p.drop("out_of_bounds", 2)
    return json.loads(json.dumps(p.to_obj()))


def test_from_obj_reads_back_to_obj() -> None:
    obj = _valid_obj()
    p = Partial.from_obj(obj, 3)
    assert p.to_obj() == obj
    assert p.stats(0)["mean"] == 1.5 and p.stats(1)["count"] == 1 and p.dropped == {"out_of_bounds": 2}


def _set(obj: dict[str, Any], key: str, index: int | None, value: Any) -> dict[str, Any]:
    if index is None:
        obj[key] = value
    else:
        obj[key][index] = value
    return obj


NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    ("key", "index", "value"),
    [
        ("count", None, [2, 1]),
        ("count", None, [2, 1, 0, 0]),
        ("mean", None, [[1.5], [5.0]]),
        ("mean", 0, [1.5, 0.0]),
        ("co", None, [[0.5], [0.0], [0.0], [0.0]]),
        ("min", None, [[1.0]]),
        ("max", None, [[2.0], [5.0], None, None]),
        ("count", 0, -1),
        ("co", 0, [-0.5]),
        ("dropped", None, {"out_of_bounds": -2}),
        ("count", 1, NAN),
        ("mean", 0, [NAN]),
        ("co", 0, [NAN]),
        ("mean", 0, [INF]),
        ("co", 1, [INF]),
        ("count", None, "abc"),
        ("count", None, None),
        ("mean", 0, ["x"]),
        ("mean", 0, 1.5),
        ("min", None, 5),
        ("dropped", None, {"x": "many"}),
        ("dropped", None, [1, 2]),
        ("clipped", None, -1),
    ],
)
def test_from_obj_rejects_malformed_partials(key: str, index: int | None, value: Any) -> None:
    obj = _set(_valid_obj(), key, index, value)
    with pytest.raises(DispersError) as info:
        Partial.from_obj(obj, 3)
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("key", ["count", "mean", "co", "min", "max", "dropped"])
def test_from_obj_rejects_a_missing_field(key: str) -> None:
    obj = _valid_obj()
    del obj[key]
    with pytest.raises(DispersError) as info:
        Partial.from_obj(obj, 3)
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("obj", [None, [], "partial", 3])
def test_from_obj_rejects_a_non_object(obj: Any) -> None:
    with pytest.raises(DispersError) as info:
        Partial.from_obj(obj, 3)
    assert info.value.code is ErrorCode.MALFORMED


def test_from_obj_rejects_the_wrong_group_count() -> None:
    with pytest.raises(DispersError) as info:
        Partial.from_obj(_valid_obj(), 4)
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize(("key", "index"), [("min", 0), ("max", 1)])
def test_from_obj_rejects_nan_min_or_max(key: str, index: int) -> None:
    obj = _set(_valid_obj(), key, index, [NAN])
    with pytest.raises(DispersError) as info:
        Partial.from_obj(obj, 3)
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("count", [1.5, "3"])
def test_from_obj_rejects_non_integer_counts(count: Any) -> None:
    obj = _set(_valid_obj(), "count", 1, count)
    with pytest.raises(DispersError) as info:
        Partial.from_obj(obj, 3)
    assert info.value.code is ErrorCode.MALFORMED


# --- histograms, median and quantiles ------------------------------------------------------------

EDGES_H = (30.0, 60.0, 70.0, 80.0, 220.0)


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.floats(30.0, 220.0)), min_size=0, max_size=200),
    st.lists(st.integers(0, 200), max_size=6),
)
def test_histograms_merge_to_numpys_histogram(items: list[tuple[int, float]], cuts: list[int]) -> None:
    """Any split of the values into partials, merged (through JSON), gives numpy's histogram of
    each group (numpy's convention: the last bin holds its upper edge)."""
    groups = [g for g, _ in items]
    values = [v for _, v in items]
    bounds = sorted({0, len(items), *(c for c in cuts if c <= len(items))})
    parts = [
        Partial.of(3, groups[a:b], values[a:b], EDGES_H) for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    total = Partial.empty(3, EDGES_H)
    for p in parts:
        total.merge(Partial.from_obj(json.loads(json.dumps(p.to_obj())), 3, EDGES_H))
    assert total.hist is not None
    for g in range(3):
        expected, _ = np.histogram([v for gg, v in items if gg == g], bins=EDGES_H)
        assert total.hist[g].tolist() == expected.tolist()


def test_a_histogram_that_does_not_add_up_is_refused() -> None:
    obj = Partial.of(1, [0, 0], [40.0, 90.0], EDGES_H).to_obj()
    obj["hist"][0][0] += 1
    with pytest.raises(DispersError, match="add up"):
        Partial.from_obj(obj, 1, EDGES_H)


def test_median_and_quantiles_read_off_the_histogram_contain_the_true_ones() -> None:
    """Exact release (no noise): the histogram is numpy's, and each quantile lies in the bin the
    true quantile lies in — the resolution the result states as the quantile's interval."""
    rng = np.random.default_rng(2)
    values = np.clip(rng.normal(72, 9, 500), 30, 220)
    edges = tuple(float(e) for e in np.linspace(30, 220, 39))  # 5-bpm bins
    partial = Partial.of(1, np.zeros(500, dtype=int), values, edges)
    spec = AggregateSpec(
        new_query_id(), 10, (30.0, 220.0), ("count", "histogram", "median", "quantiles"), ("all",),
        bins=edges, quantiles=(0.1, 0.9),
    )  # fmt: skip
    group = partial.release(spec).groups[0]
    assert list(group.histogram) == np.histogram(values, bins=edges)[0].tolist()
    for key, level in (("median", 0.5), ("q0.1", 0.1), ("q0.9", 0.9)):
        lo, hi = group.intervals[key]
        assert hi - lo == pytest.approx(5.0)
        assert lo <= group.values[key] <= hi  # type: ignore[operator]
        assert lo - 1e-9 <= float(np.quantile(values, level)) <= hi + 1e-9, key


def test_noised_histograms_and_quantiles() -> None:
    from dispers.core.spec import Privacy
    from dispers.protocol.aggregation.release import plan_noise, release_dp

    rng = np.random.default_rng(3)
    values = np.clip(rng.normal(72, 9, 2000), 30, 220)
    edges = tuple(float(e) for e in np.linspace(30, 220, 20))
    partial = Partial.of(1, np.zeros(2000, dtype=int), values, edges)
    spec = AggregateSpec(
        new_query_id(), 10, (30.0, 220.0), ("count", "histogram", "median"), ("all",), bins=edges
    )
    plan = plan_noise(spec, Privacy(epsilon=1.0))
    assert plan.histogram is not None and plan.histogram.scale == pytest.approx(2.0)  # epsilon / 2 shares
    group = release_dp(partial, spec, Privacy(epsilon=1.0)).groups[0]
    exact = np.histogram(values, bins=edges)[0]
    assert len(group.histogram) == len(exact) and list(group.histogram) != exact.tolist()
    assert all(x >= 0 and float(x).is_integer() for x in group.histogram)
    lo, hi = group.intervals["median"]
    assert lo <= group.values["median"] <= hi  # type: ignore[operator]
    assert abs(group.values["median"] - np.median(values)) < 3 * (edges[1] - edges[0])  # type: ignore[operator]
