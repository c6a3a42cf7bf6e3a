"""The root DA's DP release: calibration, coverage of the 95% intervals, the differencing attack."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dispers.core.ids import new_query_id
from dispers.core.spec import AggregateSpec, Privacy
from dispers.protocol.aggregation.partial import Partial
from dispers.protocol.aggregation.release import noise_std, plan_noise, release_dp

BOUNDS = (30.0, 220.0)
LABELS = ("young", "old")


def spec(stats: tuple[str, ...] = ("count", "sum", "mean", "std"), k: int = 10) -> AggregateSpec:
    return AggregateSpec(new_query_id(), k, BOUNDS, stats, LABELS)


def population(seed: int = 1, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 2, n)
    values = np.clip(rng.normal(72, 8, n), *BOUNDS)
    return groups, values


def test_the_budget_is_split_over_the_vectors_measured() -> None:
    """Counts (sensitivity 1), centred sums (R) and centred squares (R^2), each at epsilon/3."""
    plan = plan_noise(spec(("count", "mean", "std")), Privacy(epsilon=1.5))
    half = (BOUNDS[1] - BOUNDS[0]) / 2
    assert plan.counts.scale == pytest.approx(3 / 1.5)
    # The grid's rounding is accounted for: at most 0.1% above the bare calibration, never below.
    assert plan.sums is not None and plan.squares is not None
    for noise, bare in ((plan.sums, 3 * half / 1.5), (plan.squares, 3 * half * half / 1.5)):
        assert bare <= noise.scale <= bare * 1.001
    only_counts = plan_noise(spec(("count",)), Privacy(epsilon=1.5))
    assert only_counts.counts.scale == pytest.approx(1 / 1.5) and only_counts.sums is None


def test_released_counts_and_sums_spread_as_calibrated() -> None:
    """Over many releases of one partial, each released count's and sum's spread matches the
    noise the plan calibrated (within 5 standard errors of a variance estimate)."""
    groups, values = population()
    partial = Partial.of(2, groups, values)
    s = spec(("count", "sum"), k=2)
    privacy = Privacy(epsilon=2.0)
    plan = plan_noise(s, privacy)
    runs = 600
    counts, sums = [], []
    for _ in range(runs):
        result = release_dp(partial, s, privacy)
        g = result.group("young")
        counts.append(g.values["count"])
        sums.append(g.values["sum"])
    true_n = int((groups == 0).sum())
    true_sum = float(values[groups == 0].sum())
    for sample, truth, sd in (
        (np.asarray(counts, float), true_n, noise_std(plan.counts)),
        # sum = S + c n: both noises add
        (np.asarray(sums, float), true_sum, math.hypot(noise_std(plan.sums), 125.0 * noise_std(plan.counts))),  # type: ignore[arg-type]
    ):
        assert abs(sample.mean() - truth) < 5 * sd / math.sqrt(runs)
        # the variance of a sample variance is about (kurtosis - 1) var^2 / runs; Laplace: 6.
        assert abs(sample.var() - sd**2) < 5 * math.sqrt(6 / runs) * sd**2


def test_the_95_percent_intervals_cover_about_95_percent_of_the_time() -> None:
    groups, values = population(seed=3, n=300)
    partial = Partial.of(2, groups, values)
    s = spec(("count", "mean", "std"), k=2)
    truth = {
        "count": (groups == 0).sum(),
        "mean": values[groups == 0].mean(),
        "std": values[groups == 0].std(ddof=1),
    }
    runs = 300
    hits = dict.fromkeys(truth, 0)
    for _ in range(runs):
        g = release_dp(partial, s, Privacy(epsilon=1.0)).group("young")
        for stat, value in truth.items():
            lo, hi = g.intervals[stat]
            hits[stat] += lo <= value <= hi
    for stat, n in hits.items():
        # 95% of 300: 285 +- 3.8 (one s.e.); allow 4 s.e. below and a conservative excess above
        assert 0.95 * runs - 4 * math.sqrt(runs * 0.95 * 0.05) <= n, (stat, n)


def test_the_differencing_attack_reads_noise_not_the_persons_value() -> None:
    """Two k-compliant queries whose targets differ by one person: without noise the difference
    of the sums is that person's heart rate exactly. With DP it is spread as the calibration
    says (the difference of two independent noises), and the person's value is not singled out."""
    rng = np.random.default_rng(5)
    values = np.clip(rng.normal(72, 8, 200), *BOUNDS)
    person = 151.0
    with_person = Partial.of(1, np.zeros(201, dtype=int), np.append(values, person))
    without = Partial.of(1, np.zeros(200, dtype=int), values)
    s = AggregateSpec(new_query_id(), 10, BOUNDS, ("sum",), ("all",))
    privacy = Privacy(epsilon=1.0)
    exact = with_person.stats(0)["sum"] - without.stats(0)["sum"]  # type: ignore[operator]
    assert exact == pytest.approx(person)
    diffs = np.array(
        [
            release_dp(with_person, s, privacy).groups[0].values["sum"]  # type: ignore[operator]
            - release_dp(without, s, privacy).groups[0].values["sum"]
            for _ in range(400)
        ]
    )
    plan = plan_noise(s, privacy)
    sd = math.sqrt(2) * math.hypot(noise_std(plan.sums), 125.0 * noise_std(plan.counts))  # type: ignore[arg-type]
    assert abs(diffs.std() - sd) < 0.2 * sd
    assert sd > 3 * person  # the noise swamps any one heart rate
    assert np.mean(np.abs(diffs - person) < 5) < 0.05  # the attacker rarely lands near the value


def test_groups_are_released_on_their_noised_count_only() -> None:
    """Threshold on the noised count (post-processing): a group of exactly k people is
    sometimes suppressed, sometimes released, never decided by the true count."""
    groups = np.array([0] * 10 + [1] * 300)
    values = np.full(310, 70.0)
    partial = Partial.of(2, groups, values)
    s = spec(("count",), k=10)
    outcomes = {release_dp(partial, s, Privacy(epsilon=0.5)).group("young").suppressed for _ in range(200)}
    assert outcomes == {True, False}


def test_the_release_says_it_is_noised_and_what_it_cost() -> None:
    groups, values = population()
    result = release_dp(Partial.of(2, groups, values), spec(), Privacy(epsilon=1.0), left=(9.0, 1e-5))
    assert result.privacy.noised and result.privacy.mechanism == "laplace"
    assert (result.privacy.epsilon, result.privacy.epsilon_left) == (1.0, 9.0)
    g = result.group("old")
    assert set(g.intervals) == set(g.noise) == {"count", "sum", "mean", "std"}
    assert all(lo <= g.values[s] <= hi for s, (lo, hi) in g.intervals.items())  # type: ignore[operator]


def test_gaussian_release() -> None:
    groups, values = population()
    result = release_dp(
        Partial.of(2, groups, values), spec(), Privacy(epsilon=1.0, delta=1e-6, mechanism="gaussian")
    )
    assert result.privacy.mechanism == "gaussian" and result.group("old").values["mean"] is not None


def test_gaussian_vectors_are_accounted_jointly_in_zcdp_when_that_is_tighter() -> None:
    """Three fields with cov: ten vectors. Accounted in zCDP, each gets sigma = c x its
    (grid-rounded) sensitivity with B / (2 c^2) <= rho(epsilon, delta); recomputed here from the
    discrete Gaussian's rho (CKS20) and the zCDP -> (epsilon, delta) conversion (Bun & Steinke),
    the query stays within its (epsilon, delta), with noise about 2.4x below basic composition."""

    bounds = ((30.0, 220.0), (20.0, 130.0), (0.0, 16000.0))
    s = AggregateSpec(
        new_query_id(), 10, bounds[0], ("count", "cov"), ("all",), 3,
        field_names=("hr", "w", "steps"), field_bounds=bounds,
    )  # fmt: skip
    privacy = Privacy(epsilon=1.0, delta=1e-6, mechanism="gaussian")
    plan = plan_noise(s, privacy)
    assert plan.accounting == "zcdp" and len(plan.blocks) == 9
    halves = [(hi - lo) / 2 for lo, hi in bounds]
    rho = 1.0 / (2 * plan.counts.scale**2)  # counts: sensitivity 1 on the unit grid
    for block, noise in plan.blocks.items():
        f, g = (block[1], block[1]) if block[0] in ("sum", "sq") else (block[1], block[2])
        sens = halves[f] if block[0] == "sum" else halves[f] * halves[g]
        steps = math.ceil(sens / noise.granularity)  # rounding can stretch to the next step
        rho += steps**2 / (2 * (noise.scale / noise.granularity) ** 2)
        assert noise.scale / noise.granularity >= 1000  # a fine grid
    epsilon = rho + 2 * math.sqrt(rho * math.log(1 / privacy.delta))
    assert epsilon <= privacy.epsilon * (1 + 1e-9)
    assert epsilon >= 0.99 * privacy.epsilon  # and not wastefully below it
    # Basic composition would split (1, 1e-6) ten ways: sigma about 2.4x larger for every vector.
    from dispers.protocol.aggregation.dp import gaussian_sigma

    split = gaussian_sigma(1.0, 0.1, 1e-7)
    assert plan.counts.scale < split / 2.2
    # One vector alone: the analytic Gaussian's own calibration is tighter, and is kept.
    one = plan_noise(spec(("count",)), privacy)
    assert one.accounting == "basic"
    result = release_dp(Partial.of(2, *population()), spec(("count",)), privacy)
    assert result.privacy.accounting == "basic"
