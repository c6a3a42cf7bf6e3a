"""Several fields per contribution: covariance, correlation and least squares from co-moment
partials, against numpy on the same values, in any tree of merges, exact and under DP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import new_query_id
from dispers.core.spec import AggregateSpec, Privacy, Regression
from dispers.protocol.aggregation.partial import Partial, merged
from dispers.protocol.aggregation.release import noise_std, plan_noise, release_dp

NAMES = ("y", "a", "b")
BOUNDS = ((-50.0, 50.0), (-10.0, 10.0), (0.0, 20.0))
MULTI = ("count", "mean", "std", "cov", "corr", "ols")
REGRESSION = Regression("y", ("a", "b"))


def spec(
    stats: tuple[str, ...] = MULTI,
    k: int = 3,
    groups: tuple[str, ...] = ("g0", "g1"),
    regression: Regression | None = REGRESSION,
    clip: bool = False,
) -> AggregateSpec:
    return AggregateSpec(
        new_query_id(), k, BOUNDS[0], stats, groups, 3,
        field_names=NAMES, field_bounds=BOUNDS, regression=regression if "ols" in stats else None,
        clip=clip,
    )  # fmt: skip


def linear_population(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """y = 2 + 0.5 a - 1.5 b + N(0, 2), a ~ N(0, 3), b ~ U(0, 20), all within the bounds."""
    rng = np.random.default_rng(seed)
    a = np.clip(rng.normal(0, 3, n), *BOUNDS[1])
    b = rng.uniform(0, 20, n)
    y = np.clip(2 + 0.5 * a - 1.5 * b + rng.normal(0, 2, n), *BOUNDS[0])
    return np.zeros(n, dtype=np.int64), np.column_stack([y, a, b])


TRUE_BETA = {"intercept": 2.0, "a": 0.5, "b": -1.5}


def numpy_truth(values: np.ndarray) -> dict[str, float]:
    """Every statistic of one group computed directly (numpy's cov, corrcoef and lstsq)."""
    out: dict[str, float] = {"count": float(len(values))}
    for f, name in enumerate(NAMES):
        out[f"{name}.mean"] = float(values[:, f].mean())
        out[f"{name}.std"] = float(values[:, f].std(ddof=1))
    cov = np.cov(values, rowvar=False, ddof=1)
    corr = np.corrcoef(values, rowvar=False)
    for i in range(3):
        for j in range(i + 1, 3):
            out[f"cov({NAMES[i]},{NAMES[j]})"] = float(cov[i, j])
            out[f"corr({NAMES[i]},{NAMES[j]})"] = float(corr[i, j])
    design = np.column_stack([np.ones(len(values)), values[:, 1], values[:, 2]])
    beta, *_ = np.linalg.lstsq(design, values[:, 0], rcond=None)
    rss = np.array([((values[:, 0] - design @ beta) ** 2).sum()])
    sigma2 = float(rss[0]) / max(len(values) - 3, 1)
    se = np.sqrt(sigma2 * np.diag(np.linalg.inv(design.T @ design)))
    for k, name in enumerate(("intercept", "a", "b")):
        out[f"ols.{name}"] = float(beta[k])
        out[f"ols.se.{name}"] = float(se[k])
    out["ols.r2"] = 1 - float(rss[0]) / float(((values[:, 0] - values[:, 0].mean()) ** 2).sum())
    return out


def _tree(n_groups: int, groups: np.ndarray, values: np.ndarray, cuts: list[int], depth: int) -> Partial:
    """Leaves over slices of the data, merged pairwise up `depth` levels through JSON (as DAs do)."""
    bounds = [0, *sorted(set(c % (len(values) + 1) for c in cuts)), len(values)]
    nodes = [
        Partial.from_obj(
            json.loads(json.dumps(Partial.of(n_groups, groups[a:b], values[a:b]).to_obj())), n_groups, (), 3
        )
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    for _ in range(depth):
        if len(nodes) == 1:
            break
        nodes = [merged(nodes[i : i + 2], n_groups, 3) for i in range(0, len(nodes), 2)]
    return merged(nodes, n_groups, 3)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=8, max_value=300),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    depth=st.integers(min_value=0, max_value=4),
)
def test_every_statistic_in_any_tree_equals_numpy(n: int, seed: int, cuts: list[int], depth: int) -> None:
    """Random populations, random leaf slices and tree depths: the released exact statistics of
    every group equal numpy's on that group's values."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 2, n)
    _, values = linear_population(n, seed)
    values[:, 1] += rng.normal(0, 1, n) * (groups == 1)  # groups differ
    values = np.clip(values, [b[0] for b in BOUNDS], [b[1] for b in BOUNDS])
    result = _tree(2, groups, values, cuts, depth).release(spec())
    for g, label in enumerate(("g0", "g1")):
        mine = values[groups == g]
        group = result.group(label)
        if len(mine) < 3:
            assert group.suppressed
            continue
        for key, want in numpy_truth(mine).items():
            got = group.values[key]
            if len(mine) < 5 and key.startswith("ols."):
                continue  # too few points for a stable check of the regression
            assert got is not None, key
            assert math.isclose(got, want, rel_tol=1e-7, abs_tol=1e-8), (key, got, want)


def test_a_known_linear_relation_is_recovered_within_its_stated_error() -> None:
    groups, values = linear_population(4000, seed=7)
    group = Partial.of(1, groups, values).release(spec(groups=("all",))).groups[0]
    for name, true in TRUE_BETA.items():
        value, se = group.values[f"ols.{name}"], group.values[f"ols.se.{name}"]
        assert value is not None and se is not None
        assert abs(value - true) < 3 * se, (name, value, se)
        lo, hi = group.intervals[f"ols.{name}"]
        assert lo < value < hi and (hi - lo) == pytest.approx(2 * 1.959964 * se)
    # corr(y, b): b explains most of y's spread
    corr = group.values["corr(y,b)"]
    assert corr is not None and -1 < corr < -0.9


@pytest.mark.parametrize(
    "privacy", [Privacy(epsilon=1.0), Privacy(epsilon=1.0, delta=1e-6, mechanism="gaussian")], ids=str
)
def test_under_dp_the_coefficients_intervals_cover_the_truth(privacy: Privacy) -> None:
    """Over repeated DP releases the stated 95% intervals (noise and sampling error together)
    cover the true coefficients about 95% of the time, and the correlation's its true value."""
    groups, values = linear_population(3000, seed=9)
    partial = Partial.of(1, groups, values)
    s = spec(groups=("all",), k=10)
    exact = partial.release(s).groups[0].values
    runs = 120
    hits = dict.fromkeys([*TRUE_BETA, "corr"], 0)
    for _ in range(runs):
        g = release_dp(partial, s, privacy).groups[0]
        for name, true in TRUE_BETA.items():
            lo, hi = g.intervals[f"ols.{name}"]
            hits[name] += lo <= true <= hi
        # About one release in 10,000 noises y's variance below zero: its correlation is then
        # released as None, with no interval, which counts as a miss here.
        if "corr(y,b)" in g.intervals:
            lo, hi = g.intervals["corr(y,b)"]
            hits["corr"] += lo <= exact["corr(y,b)"] <= hi  # type: ignore[operator]
        else:
            assert g.values["corr(y,b)"] is None
    for name, n_hit in hits.items():
        # Conditional on one sample, the coverage of the true coefficient is not exactly 95%
        # (here it measures 95-97% over 400 runs): 85% is far below any honest calibration and
        # far above what intervals of the noise alone give (they miss the sampling error).
        assert n_hit >= 0.85 * runs, (name, n_hit)


def test_the_budget_is_split_over_every_vector_measured() -> None:
    """cov over three fields measures counts, 3 sums, 3 squares and 3 cross-products: ten equal
    shares of epsilon, each calibrated to its own sensitivity (R_f, R_f^2, R_f R_g)."""
    plan = plan_noise(spec(("count", "cov"), regression=None), Privacy(epsilon=2.0))
    assert len(plan.blocks) == 9 and plan.counts.scale == pytest.approx(10 / 2.0)
    halves = [(hi - lo) / 2 for lo, hi in BOUNDS]
    cross = plan.blocks[("cross", 0, 2)]
    bare = halves[0] * halves[2] * 10 / 2.0
    assert bare <= cross.scale <= bare * 1.001
    # ols of y on a alone needs neither b's sums nor any product with b
    only = plan_noise(spec(("ols",), regression=Regression("y", ("a",))), Privacy(epsilon=1.0))
    assert set(only.blocks) == {("sum", 0), ("sum", 1), ("sq", 0), ("sq", 1), ("cross", 0, 1)}


def test_the_noise_on_a_covariance_spreads_as_reported() -> None:
    groups, values = linear_population(2000, seed=3)
    partial = Partial.of(1, groups, values)
    s = spec(("count", "cov"), regression=None, groups=("all",), k=10)
    exact = partial.release(s).groups[0].values["cov(a,b)"]
    draws = [release_dp(partial, s, Privacy(epsilon=1.0)).groups[0] for _ in range(300)]
    spread = np.std([g.values["cov(a,b)"] for g in draws])
    reported = np.mean([g.noise["cov(a,b)"] for g in draws])
    assert 0.8 * reported < spread < 1.25 * reported
    assert abs(np.mean([g.values["cov(a,b)"] for g in draws]) - exact) < 4 * spread / math.sqrt(300)  # type: ignore[operator]
    assert noise_std(plan_noise(s, Privacy(epsilon=1.0)).counts) > 0


def test_clipping_counts_what_it_clipped_and_keeps_the_value() -> None:
    """out_of_bounds = clip: a value beyond its bound is brought to it and counted as clipped;
    drop (the default) leaves the contribution out and counts it as dropped."""
    groups, values = linear_population(50, seed=1)
    values[0, 2] = 500.0  # b beyond its upper bound 20
    s_clip = spec(("count", "mean"), regression=None, groups=("all",), clip=True)
    clipped = np.clip(values, [b[0] for b in BOUNDS], [b[1] for b in BOUNDS])
    p = Partial.of(1, groups, clipped)
    p.clipped = 1
    result = p.release(s_clip)
    assert result.groups[0].values["b.mean"] == pytest.approx(clipped[:, 2].mean())
    assert result.clipped is None  # 1 < k: a count under k is never a number
    p.clipped = 5
    assert p.release(s_clip).clipped == 5


def test_a_partial_with_the_wrong_number_of_fields_is_refused() -> None:
    obj = json.loads(json.dumps(Partial.of(1, [0, 0], [[1.0, 2.0], [3.0, 4.0]]).to_obj()))
    with pytest.raises(DispersError) as info:
        Partial.from_obj(obj, 1, (), 3)
    assert info.value.code is ErrorCode.MALFORMED
    assert Partial.from_obj(obj, 1, (), 2).co[0, 0, 1] == pytest.approx(2.0)


def test_a_singular_regression_gives_no_coefficients_rather_than_a_guess() -> None:
    """A regressor with no spread: ols is undefined, released as None, never a pseudo-inverse."""
    groups, values = linear_population(40, seed=2)
    values[:, 2] = 5.0
    group = Partial.of(1, groups, values).release(spec(groups=("all",))).groups[0]
    assert group.values["ols.b"] is None and group.values["ols.intercept"] is None
    assert group.values["y.mean"] == pytest.approx(values[:, 0].mean())
