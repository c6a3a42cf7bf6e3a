"""Tests of the differential-privacy noise (dispers.protocol.aggregation.dp): calibration and spread.

Statistical tolerances. Each empirical check draws N = 20,000 samples in one vector call and allows
5 standard errors of its estimator (a false alarm about once in 1.7 million for a normal estimate):

- the mean: 5 sd / sqrt(N);
- the variance: 5 SE with SE(s**2) = sqrt((mu4 - var**2) / N), that is var sqrt(5/N) for Laplace
  (kurtosis 6) and var sqrt(2/N) for the Gaussian (kurtosis 3): 7.9 % and 5 % relative;
- the coverage of the 95 % interval: 0.95 +- 0.01 as asked, and >= 0.95 - 4 SE, SE = 0.0015.

At 1000 or more grid steps per scale the discrete distributions' variances are within 1e-6 relative
of 2 b**2 and sigma**2 (checked exactly below), far inside these tolerances.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.aggregation.dp import (
    MECHANISMS,
    Noise,
    add_noise,
    calibrate,
    default_granularity,
    gaussian_sigma,
    interval_halfwidth,
    laplace_scale,
    release_count,
    rho_to_epsilon,
    zcdp_rho,
)

N = 20_000
SCALES = (1.0, 37.5, 1e4)


def _phi(x: float) -> float:
    return NormalDist().cdf(x)


def _continuous_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """Balle & Wang's exact delta of the Gaussian mechanism, written out independently of the module."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def _discrete_pmf(
    mechanism: str, grid_scale: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Support and probabilities of the discrete Laplace / Gaussian with `grid_scale` (truncated far out)."""
    reach = int(60 * grid_scale) + 20 if mechanism == "gaussian" else int(80 * grid_scale) + 20
    k = np.arange(-reach, reach + 1, dtype=np.float64)
    logw = -np.abs(k) / grid_scale if mechanism == "laplace" else -(k * k) / (2 * grid_scale**2)
    w = np.exp(logw - logw.max())
    return k, w / w.sum()


def _malformed(excinfo: pytest.ExceptionInfo[DispersError], word: str) -> None:
    assert excinfo.value.code is ErrorCode.MALFORMED
    assert word in excinfo.value.message


# --- calibration --------------------------------------------------------------------------------------


def test_laplace_scale_is_sensitivity_over_epsilon() -> None:
    assert laplace_scale(1, 0.5) == 2.0
    assert laplace_scale(200, 0.1) == pytest.approx(2000.0)
    assert laplace_scale(0, 1.0) == 0.0


def test_zcdp_rho_and_its_epsilon_by_hand() -> None:
    assert zcdp_rho(2, 4) == 0.125  # 2**2 / (2 * 4**2)
    # 0.125 + 2 sqrt(0.125 ln 1e5) = 0.125 + 2 sqrt(1.43912) = 0.125 + 2.39926
    assert rho_to_epsilon(0.125, 1e-5) == pytest.approx(2.524263, abs=1e-6)
    assert rho_to_epsilon(0, 1e-5) == 0.0


def test_gaussian_sigma_known_value_and_linear_in_sensitivity() -> None:
    # Balle & Wang: sensitivity 1, epsilon 1, delta 1e-5 gives sigma ~ 3.73 (classical: 4.84).
    sigma = gaussian_sigma(1, 1, 1e-5)
    assert sigma == pytest.approx(3.7306, abs=1e-3)
    assert gaussian_sigma(200, 1, 1e-5) == pytest.approx(200 * sigma, rel=1e-9)
    assert gaussian_sigma(0, 1, 1e-5) == 0.0


@pytest.mark.parametrize("epsilon", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("delta", [1e-5, 1e-9])
def test_analytic_gaussian_beats_the_classical_one(epsilon: float, delta: float) -> None:
    classical = math.sqrt(2 * math.log(1.25 / delta)) * 3.0 / epsilon
    assert gaussian_sigma(3.0, epsilon, delta) < classical


@pytest.mark.parametrize(
    ("sensitivity", "epsilon", "delta"),
    [(1, 1, 1e-5), (3, 0.1, 1e-6), (200, 0.5, 1e-9), (1, 2, 1e-5), (0.5, 5, 1e-3)],
)
def test_analytic_gaussian_meets_the_exact_condition_and_no_less_sigma_does(
    sensitivity: float, epsilon: float, delta: float
) -> None:
    sigma = gaussian_sigma(sensitivity, epsilon, delta)
    assert _continuous_delta(sigma, sensitivity, epsilon) <= delta * (1 + 1e-9)
    assert _continuous_delta(sigma * (1 - 1e-7), sensitivity, epsilon) > delta  # the least such sigma
    assert _continuous_delta(0.95 * sigma, sensitivity, epsilon) > delta


def test_gaussian_sigma_stays_finite_at_extreme_epsilons() -> None:
    for epsilon in (1e-3, 50.0, 800.0):
        sigma = gaussian_sigma(1, epsilon, 1e-6)
        assert 0 < sigma < math.inf
    assert gaussian_sigma(1, 800.0, 1e-6) < gaussian_sigma(1, 50.0, 1e-6) < gaussian_sigma(1, 1e-3, 1e-6)


@pytest.mark.parametrize(("scale", "expected"), [(1.0, 2.0**-10), (37.5, 2.0**-5), (1e4, 8.0), (1000.0, 1.0)])
def test_default_granularity_is_the_largest_power_of_two_at_most_a_thousandth(
    scale: float, expected: float
) -> None:
    g = default_granularity(scale)
    assert g == expected
    assert math.frexp(g)[0] == 0.5  # a power of two
    assert scale / 2000 < g <= scale / 1000


def test_calibrate_laplace_whole_steps_cost_nothing() -> None:
    noise = calibrate("laplace", 1, 0.5)
    assert noise.mechanism == "laplace"
    assert noise.scale == 2.0  # 1 is a whole number of power-of-two steps
    assert noise.granularity <= noise.scale / 1000
    # several coordinates: a step each on top
    vec = calibrate("laplace", 2, 0.5, coordinates=3)
    assert vec.scale == pytest.approx((2 + 3 * vec.granularity) / 0.5)


def test_calibrate_gaussian_is_dp_for_the_discrete_gaussian_on_its_grid() -> None:
    """CKS20 Theorem 7: for integer sensitivity D and discrete Gaussian Y of sigma s, the exact delta
    is P[Y > e s**2 / D - D / 2] - exp(e) P[Y > e s**2 / D + D / 2]."""
    for sensitivity, epsilon, delta in [(1, 1, 1e-5), (200 / 3, 0.5, 1e-6), (3, 2, 1e-5), (1, 5, 1e-6)]:
        noise = calibrate("gaussian", sensitivity, epsilon, delta)
        assert noise.granularity <= min(noise.scale, sensitivity) / 1000
        s = noise.scale / noise.granularity
        d = math.ceil(sensitivity / noise.granularity)
        k, p = _discrete_pmf("gaussian", s)
        c = epsilon * s * s / d
        exact = p[k > c - d / 2].sum() - math.exp(epsilon) * p[k > c + d / 2].sum()
        assert exact <= delta
        assert exact >= 0.9 * delta  # and not wastefully below it


# --- the discrete distributions ----------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_discrete_variance_is_the_continuous_one_at_a_thousand_steps(mechanism: str) -> None:
    for grid_scale in (1000.0, 1999.0):
        k, p = _discrete_pmf(mechanism, grid_scale)
        variance = float((p * k * k).sum())
        target = 2 * grid_scale**2 if mechanism == "laplace" else grid_scale**2
        assert variance == pytest.approx(target, rel=1e-6)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_interval_covers_exactly_even_on_a_coarse_grid(mechanism: str, level: float) -> None:
    """Exact discrete coverage, where the grid matters most: a scale of 0.1 to 50 grid steps."""
    for grid_scale in np.concatenate([np.linspace(0.1, 5, 50), np.linspace(5, 50, 19)]):
        noise = Noise(mechanism, float(grid_scale), 1.0)
        h = interval_halfwidth(noise, level)
        assert h == int(h)
        k, p = _discrete_pmf(mechanism, float(grid_scale))
        assert p[np.abs(k) <= h].sum() >= level


# --- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("scale", SCALES)
def test_empirical_spread_matches_the_calibration(mechanism: str, scale: float) -> None:
    noise = Noise(mechanism, scale, default_granularity(scale))
    value = 3.3 * scale
    out = add_noise(np.full(N, value), noise)
    assert out.shape == (N,) and out.dtype == np.float64
    steps = out / noise.granularity
    assert np.array_equal(steps, np.round(steps))  # on the grid
    drawn = out - math.floor(value / noise.granularity + 0.5) * noise.granularity
    variance = 2 * scale**2 if mechanism == "laplace" else scale**2
    kurtosis = 6.0 if mechanism == "laplace" else 3.0
    assert abs(drawn.mean()) <= 5 * math.sqrt(variance / N)
    se_variance = variance * math.sqrt((kurtosis - 1) / N)
    assert abs(drawn.var(ddof=1) - variance) <= 5 * se_variance


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_95_percent_interval_covers_95_percent(mechanism: str) -> None:
    noise = Noise(mechanism, 37.5, default_granularity(37.5))
    h = interval_halfwidth(noise)
    drawn = add_noise(np.zeros(N), noise)
    coverage = float(np.mean(np.abs(drawn) <= h))
    assert abs(coverage - 0.95) <= 0.01
    assert coverage >= 0.95 - 4 * math.sqrt(0.95 * 0.05 / N)


def test_interval_halfwidth_formulas_rounded_up_to_the_grid() -> None:
    lap = Noise("laplace", 1.0, 2.0**-10)
    assert interval_halfwidth(lap) == math.ceil(math.log(20) * 1024) / 1024
    gauss = Noise("gaussian", 10.0, 0.5)
    assert interval_halfwidth(gauss, 0.95) == 20.0  # 10 * 1.95996 = 19.5996, up to the grid
    assert interval_halfwidth(gauss, 0.5) == 7.0  # 10 * 0.67449


def test_rounding_is_half_up_onto_the_grid() -> None:
    # Noise of 1/1000 of a grid step is 0 except with chance ~e**-1000: the grid is all that shows.
    out = add_noise([0.5, 1.49, -0.5, -0.51, 2.5, 7.0], Noise("laplace", 1e-3, 1.0))
    assert out.tolist() == [1.0, 1.0, 0.0, -1.0, 3.0, 7.0]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_noise_is_fresh_on_every_call(mechanism: str) -> None:
    noise = Noise(mechanism, 5.0, default_granularity(5.0))
    first, second = add_noise([0.0] * 100, noise), add_noise([0.0] * 100, noise)
    assert not np.array_equal(first, second)
    assert len(set(first.tolist())) > 50


def test_empty_and_large_vectors() -> None:
    assert add_noise([], Noise("laplace", 1.0, 2.0**-10)).shape == (0,)
    noise = Noise("laplace", 1e6, 1.0)  # a million grid steps
    started = time.perf_counter()
    out = add_noise(np.arange(100_000, dtype=np.float64), noise)
    assert time.perf_counter() - started < 10
    assert out.shape == (100_000,)
    drawn = out - np.arange(100_000)
    assert drawn.var() == pytest.approx(2e12, rel=5 * math.sqrt(5 / 100_000))


def test_release_count_is_a_non_negative_integer() -> None:
    noise = Noise("laplace", 1.0, 2.0**-10)  # the granularity is not used: counts live on integers
    released = release_count(1000, noise)
    assert isinstance(released, int)
    assert abs(released - 1000) <= 60  # |Laplace(1)| > 60 has chance e**-60
    zeros = [release_count(0, Noise("gaussian", 10.0, 1.0)) for _ in range(60)]
    assert min(zeros) == 0 and max(zeros) > 0  # clamped: each is 0 with chance ~1/2


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0, -1.0, math.nan, math.inf, True, "1"])
def test_bad_epsilon(epsilon: object) -> None:
    with pytest.raises(DispersError) as excinfo:
        laplace_scale(1, epsilon)  # type: ignore[arg-type]
    _malformed(excinfo, "epsilon")
    with pytest.raises(DispersError) as excinfo:
        gaussian_sigma(1, epsilon, 1e-5)  # type: ignore[arg-type]
    _malformed(excinfo, "epsilon")


@pytest.mark.parametrize("delta", [0, 1, -0.1, 1.5, math.nan])
def test_bad_delta(delta: float) -> None:
    with pytest.raises(DispersError) as excinfo:
        gaussian_sigma(1, 1, delta)
    _malformed(excinfo, "delta")
    with pytest.raises(DispersError) as excinfo:
        rho_to_epsilon(0.1, delta)
    _malformed(excinfo, "delta")
    with pytest.raises(DispersError) as excinfo:
        calibrate("gaussian", 1, 1, delta)
    _malformed(excinfo, "delta")


@pytest.mark.parametrize("sensitivity", [-1.0, math.nan, math.inf])
def test_bad_sensitivity(sensitivity: float) -> None:
    for call in (
        lambda: laplace_scale(sensitivity, 1),
        lambda: gaussian_sigma(sensitivity, 1, 1e-5),
        lambda: zcdp_rho(sensitivity, 1),
        lambda: calibrate("laplace", sensitivity, 1),
    ):
        with pytest.raises(DispersError) as excinfo:
            call()
        _malformed(excinfo, "sensitivity")


@pytest.mark.parametrize("values", [[1.0, math.nan], [math.inf], [-math.inf, 0.0]])
def test_non_finite_values(values: list[float]) -> None:
    with pytest.raises(DispersError) as excinfo:
        add_noise(values, Noise("laplace", 1.0, 2.0**-10))
    _malformed(excinfo, "values")


def test_other_bad_inputs() -> None:
    noise = Noise("laplace", 1.0, 1.0)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: Noise("exponential", 1.0, 1.0), "mechanism"),
        (lambda: Noise("laplace", 0.0, 1.0), "scale"),
        (lambda: Noise("gaussian", math.nan, 1.0), "scale"),
        (lambda: Noise("laplace", 1.0, -1.0), "granularity"),
        (lambda: Noise("laplace", 1e20, 1.0), "granularity"),
        (lambda: add_noise([[1.0, 2.0]], noise), "values"),  # type: ignore[list-item]
        (lambda: add_noise(["x"], noise), "values"),  # type: ignore[list-item]
        (lambda: add_noise([2.0**60], noise), "granularity"),
        (lambda: interval_halfwidth(noise, 1.0), "level"),
        (lambda: interval_halfwidth(noise, 0.0), "level"),
        (lambda: release_count(-1, noise), "true_count"),
        (lambda: release_count(1.5, noise), "true_count"),  # type: ignore[arg-type]
        (lambda: default_granularity(0.0), "scale"),
        (lambda: zcdp_rho(1, 0.0), "sigma"),
        (lambda: rho_to_epsilon(-0.1, 1e-5), "rho"),
        (lambda: calibrate("laplace", 0, 1), "sensitivity"),
        (lambda: calibrate("laplace", 1, 1, coordinates=0), "coordinates"),
        (lambda: calibrate("geometric", 1, 1), "mechanism"),
    ]
    for call, word in cases:
        with pytest.raises(DispersError) as excinfo:
            call()
        _malformed(excinfo, word)
