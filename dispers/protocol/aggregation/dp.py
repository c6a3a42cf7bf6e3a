"""Differential-privacy noise: calibration, and discrete noise on a fixed-point grid sampled by OpenDP.

Why discrete. Textbook Laplace noise drawn in floating point leaks the input through the pattern of
representable outputs (Mironov 2012, "On significance of the least significant bits for differential
privacy"). So no float noise is drawn here. A released statistic is first put on a fixed-point grid,
``round(v / granularity)`` as an integer, then OpenDP adds integer noise (discrete Laplace, Canonne,
Kamath & Steinke 2020 / Ghosh, Roughgarden & Sundararajan 2012; or discrete Gaussian, CKS20), and the
result is mapped back (``* granularity``). OpenDP samples exactly, on big rationals, from bits out of
its own cryptographically secure generator, never from numpy's or Python's.

Units. A `Noise` carries its scale in the statistic's units (Laplace: b; Gaussian: sigma) and the grid
step; the integer sampler sees ``scale / granularity``. `default_granularity` picks a power of two at
most ``scale / 1000``, so the grid is invisible against the noise (the discrete distribution's
variance is within about 1e-7 of the continuous one's, and rounding moves a value by at most
``granularity / 2``, i.e. 0.05 % of a scale).

Rounding and sensitivity. Rounding with ``floor(x + 1/2)`` never stretches a difference beyond the
next grid step: two values ``d`` apart land at most ``ceil(d / granularity)`` steps apart. So
when the sensitivity is a whole number of grid steps (an integer count with a power-of-two grid
at most 1, say), the grid costs nothing, and otherwise it adds at most one step per coordinate
a person can move. `calibrate` does this accounting; `laplace_scale` and `gaussian_sigma` are the
bare formulas.

Calibration and accounting.

- Laplace: ``b = sensitivity / epsilon`` with L1 sensitivity gives epsilon-DP (pure).
- Gaussian: `gaussian_sigma` is the analytic Gaussian mechanism of Balle & Wang (2018, "Improving
  the Gaussian mechanism for differential privacy", Theorem 8): the smallest sigma whose exact
  privacy profile meets (epsilon, delta), found here by bisection on that exact condition (OpenDP
  0.16 calibrates the Gaussian in zCDP only and exposes no analytic (epsilon, delta) calibration).
  The condition is that of the continuous Gaussian. The discrete Gaussian's exact delta (CKS20,
  Theorem 7) matches it within 1e-6 relative at 1000 or more grid steps per sigma, but not on a
  coarse grid: at sigma = 3.73 steps (sensitivity 1 step, epsilon 1) it is 3.5 % over. `calibrate`
  keeps the grid fine and leaves a margin (`DELTA_MARGIN`). For the discrete Gaussian, what holds exactly is
  zCDP: sigma gives ``rho = sensitivity**2 / (2 sigma**2)`` (CKS20, Theorem 4), as for the continuous
  one; `zcdp_rho` computes it and `rho_to_epsilon` converts it to (epsilon, delta) with the standard
  bound ``rho + 2 sqrt(rho ln(1/delta))`` (Bun & Steinke 2016, Proposition 1.3), which a budget
  ledger may use to compose Gaussian releases.

Thresholding a noised count at k, or clamping it at zero, is post-processing and costs no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import opendp.prelude as dp

from dispers.core.errors import DispersError, ErrorCode, malformed

dp.enable_features("contrib")

Mechanism = Literal["laplace", "gaussian"]
MECHANISMS: tuple[Mechanism, ...] = ("laplace", "gaussian")

MAX_GRID_VALUE = 2**53
"""Largest |value / granularity| add_noise accepts: exact in a float64 and far from int64 overflow."""

MAX_GRID_SCALE = 2.0**52
"""Largest scale in grid units: noise then stays below int64's limits except with chance e**-1000."""

DELTA_MARGIN = 1e-3
"""`calibrate` asks the analytic Gaussian for this much less delta than the release may spend."""

GRANULARITY_RATIO = 1000.0
"""`default_granularity` puts at least this many grid steps in one scale."""

_INT64 = np.iinfo(np.int64)
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Noise:
    """The noise one release gets: a mechanism, its scale and the grid it lives on.

    ``scale`` is in the statistic's units (Laplace: b, so the variance is 2 b**2; Gaussian: sigma)
    and must be positive: a statistic that needs no noise should not be given any. ``granularity``
    is the grid step, in the same units.
    """

    mechanism: str
    scale: float
    granularity: float

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise malformed(f"mechanism must be one of {', '.join(MECHANISMS)}, not {self.mechanism!r}")
        _check_positive("scale", self.scale)
        _check_positive("granularity", self.granularity)
        steps = self.scale / self.granularity
        if not steps <= MAX_GRID_SCALE:
            raise malformed(f"scale / granularity must be at most 2**52, got {steps:g}")


# --- calibration ------------------------------------------------------------------------------------


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """The Laplace scale b = sensitivity / epsilon giving epsilon-DP for an L1 `sensitivity`."""
    return _check_sensitivity(sensitivity) / _check_positive("epsilon", epsilon)


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """The smallest Gaussian sigma giving (epsilon, delta)-DP for an L2 `sensitivity`.

    This is the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8): sigma is the solution
    of the exact condition ``Phi(D/(2s) - e s/D) - exp(e) Phi(-D/(2s) - e s/D) <= delta``, found by
    bisection to a relative precision of about 1e-12, returning the side that satisfies it. Valid
    for every epsilon > 0 (the classical ``sqrt(2 ln(1.25/delta)) D / epsilon`` needs epsilon < 1
    and is larger).
    """
    sens = _check_sensitivity(sensitivity)
    eps = _check_positive("epsilon", epsilon)
    dlt = _check_delta(delta)
    if sens == 0:
        return 0.0
    # sigma is proportional to the sensitivity: solve for sensitivity 1, then scale.
    hi = 1.0
    while _gaussian_delta(hi, eps) > dlt:
        hi *= 2.0
    lo = hi / 2.0
    while _gaussian_delta(lo, eps) <= dlt:
        hi, lo = lo, lo / 2.0
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if _gaussian_delta(mid, eps) <= dlt:
            hi = mid
        else:
            lo = mid
    return hi * sens


def zcdp_rho(sensitivity: float, sigma: float) -> float:
    """The zCDP parameter rho = sensitivity**2 / (2 sigma**2) of (discrete) Gaussian noise sigma."""
    return _check_sensitivity(sensitivity) ** 2 / (2.0 * _check_positive("sigma", sigma) ** 2)


def rho_to_epsilon(rho: float, delta: float) -> float:
    """The epsilon of a rho-zCDP release at `delta`: rho + 2 sqrt(rho ln(1/delta)) (Bun & Steinke)."""
    value = _real("rho", rho)
    if not math.isfinite(value) or value < 0:
        raise malformed(f"rho must be a finite number >= 0, got {rho!r}")
    return value + 2.0 * math.sqrt(value * math.log(1.0 / _check_delta(delta)))


def rho_for(epsilon: float, delta: float) -> float:
    """The largest rho whose zCDP converts (`rho_to_epsilon`) to at most `epsilon` at `delta`:
    the root of rho + 2 sqrt(rho ln(1/delta)) = epsilon."""
    eps = _check_positive("epsilon", epsilon)
    log_term = math.log(1.0 / _check_delta(delta))
    return (math.sqrt(log_term + eps) - math.sqrt(log_term)) ** 2


def zcdp_gaussians(sensitivities: Sequence[tuple[float, bool]], epsilon: float, delta: float) -> list[Noise]:
    """Discrete Gaussians for several vectors released together, accounted in zCDP.

    Each entry is (L2 sensitivity, integer-valued). Every vector gets the same normalised noise
    c: its sigma is c times its sensitivity as rounding onto its grid can stretch it (a whole
    number of grid steps; integer-valued vectors live on the unit grid, and a sensitivity such
    as sqrt(2) of two unit coordinates is exact there). Vector b then spends
    rho_b = (its sensitivity)^2 / (2 sigma_b^2) = 1 / (2 c^2) (CKS20 Theorem 4, the discrete
    Gaussian's zCDP, for any sigma), zCDP composes by adding rho, and c is chosen so that the
    total B / (2 c^2) converts to (epsilon, delta) (Bun & Steinke 2016, Proposition 1.3).
    """
    count = len(sensitivities)
    if count == 0:
        return []
    c = math.sqrt(count / (2.0 * rho_for(epsilon, delta)))
    out = []
    for sensitivity, integral in sensitivities:
        sens = _check_sensitivity(sensitivity)
        if sens == 0:
            raise malformed("sensitivity is 0: the statistic needs no noise")
        if integral:
            out.append(Noise("gaussian", c * sens, 1.0))
            continue
        granularity = default_granularity(min(c * sens, sens))
        stretched = math.ceil(sens / granularity) * granularity
        out.append(Noise("gaussian", c * stretched, granularity))
    return out


def zcdp_rho_of(noises: Sequence[Noise], sensitivities: Sequence[tuple[float, bool]]) -> float:
    """The total rho of `noises` (as `zcdp_gaussians` made them) for those sensitivities, each
    rounded up to whole grid steps unless integer-valued: what an auditor recomputes."""
    total = 0.0
    for noise, (sensitivity, integral) in zip(noises, sensitivities, strict=True):
        steps = sensitivity if integral else math.ceil(sensitivity / noise.granularity) * noise.granularity
        total += zcdp_rho(steps, noise.scale)
    return total


def default_granularity(scale: float) -> float:
    """The grid step for noise of `scale`: the largest power of two at most scale / 1000.

    A scale then spans 1000 to 2000 grid steps: the grid changes the noise's variance by a relative
    1e-7 or less, and rounding a value onto it moves it by at most 1/2000 of a scale. A power of two
    keeps ``value / granularity`` and ``k * granularity`` exact in floating point.
    """
    # scale / 1000 = m 2**e with m in [1/2, 1): the largest power of two at most it is 2**(e-1).
    _, exponent = math.frexp(_check_positive("scale", scale) / GRANULARITY_RATIO)
    return math.ldexp(1.0, exponent - 1)


def calibrate(
    mechanism: str,
    sensitivity: float,
    epsilon: float,
    delta: float = 0.0,
    *,
    coordinates: int = 1,
) -> Noise:
    """The `Noise` for a release of `sensitivity`, with the grid's rounding accounted for.

    `sensitivity` is L1 for "laplace" and L2 for "gaussian"; `delta` is used by "gaussian" only
    (Laplace spends none). `coordinates` is the number of entries of the released vector one person
    can change (1 for a scalar). The grid is `default_granularity` of the smaller of the bare scale
    and the sensitivity, so that it is fine against both; rounding onto it
    can stretch a difference to the next grid step in each coordinate, so the scale is calibrated to
    ``ceil(sensitivity / granularity)`` steps for one coordinate (exactly the sensitivity when it is a
    whole number of steps), and to ``sensitivity / granularity + coordinates`` (L1) or ``+
    sqrt(coordinates)`` (L2) steps for several. The Gaussian is calibrated to ``delta * (1 -
    DELTA_MARGIN)``, covering the gap between the continuous Gaussian's delta and the discrete one's
    (a relative 1e-6 or less at 1000 grid steps per sigma; tests compute the discrete delta exactly,
    CKS20 Theorem 7). The result is then (epsilon, delta)-DP as stated.
    """
    if mechanism not in MECHANISMS:
        raise malformed(f"mechanism must be one of {', '.join(MECHANISMS)}, not {mechanism!r}")
    if isinstance(coordinates, bool) or not isinstance(coordinates, int) or coordinates < 1:
        raise malformed(f"coordinates must be an integer >= 1, got {coordinates!r}")
    sens = _check_sensitivity(sensitivity)
    if sens == 0:
        raise malformed("sensitivity is 0: the statistic needs no noise")

    def bare(s: float) -> float:
        if mechanism == "laplace":
            return laplace_scale(s, epsilon)
        return gaussian_sigma(s, epsilon, _check_delta(delta) * (1.0 - DELTA_MARGIN))

    # A grid step of at most 1/1000 of the sensitivity (as well as of the scale) keeps the rounding's
    # cost in sensitivity under 0.1 % per coordinate.
    granularity = default_granularity(min(bare(sens), sens))
    steps = sens / granularity
    if coordinates == 1:
        steps = math.ceil(steps)
    elif mechanism == "laplace":
        steps += coordinates
    else:
        steps += math.sqrt(coordinates)
    # A larger scale keeps granularity <= scale / 1000.
    return Noise(mechanism, bare(steps * granularity), granularity)


# --- sampling ---------------------------------------------------------------------------------------


def add_noise(values: Sequence[float] | npt.NDArray[Any], noise: Noise) -> npt.NDArray[np.float64]:
    """Each value put on the grid, plus independent discrete noise, as a new float array.

    The values are rounded to the nearest grid point (``floor(v / granularity + 1/2)``), OpenDP adds
    discrete Laplace (parameter ``scale / granularity``) or discrete Gaussian (sigma ``scale /
    granularity``) noise to the whole integer vector in one measurement, and the result is mapped
    back by ``* granularity``, so every output is an exact multiple of the granularity. Raises
    MALFORMED for values that are not a one-dimensional sequence of finite numbers or are too large
    for the grid (|value / granularity| > 2**53).
    """
    if not isinstance(noise, Noise):
        raise malformed("noise must be a Noise")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise malformed("values must be numbers") from exc
    if array.ndim != 1:
        raise malformed(f"values must be one-dimensional, got {array.ndim} dimensions")
    if not np.all(np.isfinite(array)):
        raise malformed("values must be finite")
    grid = np.floor(array / noise.granularity + 0.5)
    if grid.size and float(np.max(np.abs(grid))) > MAX_GRID_VALUE:
        raise malformed("values are too large for the granularity (|value / granularity| > 2**53)")
    if grid.size == 0:
        return np.zeros(0, dtype=np.float64)
    steps = grid.astype(np.int64)
    noised = np.asarray(_measurement(noise.mechanism, noise.scale / noise.granularity)(steps), dtype=np.int64)
    if noised.shape != steps.shape:
        raise DispersError(ErrorCode.INTERNAL, "the noise sampler returned a vector of the wrong length")
    if np.any(noised == _INT64.max) or np.any(noised == _INT64.min):
        raise DispersError(ErrorCode.INTERNAL, "noised value reached the integer limit")
    return noised.astype(np.float64) * noise.granularity


def release_count(true_count: int, noise: Noise) -> int:
    """A noised count: discrete noise of ``noise.scale`` on the integer grid, clamped at 0.

    Counts are integers and so is their sensitivity, so the grid here is 1 whatever
    ``noise.granularity`` says; the scale is used as given. Clamping (and any threshold at k applied
    to the result) is post-processing and costs no privacy.
    """
    if isinstance(true_count, bool) or not isinstance(true_count, int | np.integer) or true_count < 0:
        raise malformed(f"true_count must be an integer >= 0, got {true_count!r}")
    unit = Noise(noise.mechanism, noise.scale, 1.0)
    return max(0, int(add_noise(np.array([int(true_count)], dtype=np.float64), unit)[0]))


def interval_halfwidth(noise: Noise, level: float = 0.95) -> float:
    """A half-width h with P(|noise| <= h) >= `level`, rounded up to the grid.

    Laplace: ``b ln(1 / (1 - level))``; Gaussian: ``sigma z`` with z the ``(1 + level) / 2``
    standard normal quantile; then rounded up to a whole number of grid steps. The continuous
    quantile rounded up bounds the discrete one: for the discrete Laplace with parameter t, ``P(|Z| >
    m) = 2 exp(-(m+1)/t) / (1 + exp(-1/t)) <= exp(-m/t)``, and the discrete Gaussian is at least as
    concentrated at each grid point (tests check it exactly for small sigmas). The released value
    also carries the rounding onto the grid, at most ``granularity / 2``: an interval for the true
    statistic is ``h + granularity / 2`` wide on each side.
    """
    if not isinstance(noise, Noise):
        raise malformed("noise must be a Noise")
    lvl = _real("level", level)
    if not 0.0 < lvl < 1.0:
        raise malformed(f"level must be in (0, 1), got {level!r}")
    if noise.mechanism == "laplace":
        half = noise.scale * math.log(1.0 / (1.0 - lvl))
    else:
        half = noise.scale * NormalDist().inv_cdf((1.0 + lvl) / 2.0)
    return math.ceil(half / noise.granularity) * noise.granularity


# --- internals --------------------------------------------------------------------------------------


def _measurement(mechanism: str, grid_scale: float) -> dp.Measurement:
    """OpenDP's integer-vector measurement adding discrete noise of `grid_scale` to each entry."""
    atoms = dp.vector_domain(dp.atom_domain(T="i64"))
    if mechanism == "laplace":
        return dp.m.make_laplace(atoms, dp.l1_distance(T="i64"), scale=grid_scale)
    return dp.m.make_gaussian(atoms, dp.l2_distance(T="i64"), scale=grid_scale)


def _gaussian_delta(sigma: float, epsilon: float) -> float:
    """The exact delta of Gaussian noise `sigma` at `epsilon` for sensitivity 1 (Balle & Wang).

    ``Phi(a - b) - exp(epsilon) Phi(-(a + b))`` with a = 1/(2 sigma), b = epsilon sigma; the second
    term is computed as ``phi(b - a) R(a + b)`` (R the Mills ratio, since exp(epsilon) phi(a + b) =
    phi(b - a) when ab = epsilon / 2) so that neither exp(epsilon) overflows nor Phi underflows.
    """
    a = 1.0 / (2.0 * sigma)
    b = epsilon * sigma
    first = 0.5 * math.erfc((b - a) / _SQRT2)
    second = math.exp(-0.5 * (b - a) ** 2 - _LOG_SQRT_2PI) * _mills_ratio(a + b)
    return first - second


def _mills_ratio(x: float) -> float:
    """R(x) = Phi(-x) / phi(x) for x >= 0."""
    if x < 30.0:
        return 0.5 * math.erfc(x / _SQRT2) * math.exp(0.5 * x * x + _LOG_SQRT_2PI)
    inv2 = 1.0 / (x * x)  # asymptotic series; the next term is below 1e-9 relative for x >= 30
    return (1.0 - inv2 * (1.0 - 3.0 * inv2 * (1.0 - 5.0 * inv2 * (1.0 - 7.0 * inv2)))) / x


def _real(name: str, x: object) -> float:
    """`x` as a float, or MALFORMED naming `name` if it is not a real number (bools are not)."""
    if not isinstance(x, int | float | np.integer | np.floating) or isinstance(x, bool):
        raise malformed(f"{name} must be a number, got {x!r}")
    return float(x)


def _check_positive(name: str, x: object) -> float:
    value = _real(name, x)
    if not math.isfinite(value) or value <= 0:
        raise malformed(f"{name} must be a finite number > 0, got {x!r}")
    return value


def _check_sensitivity(x: object) -> float:
    value = _real("sensitivity", x)
    if not math.isfinite(value) or value < 0:
        raise malformed(f"sensitivity must be a finite number >= 0, got {x!r}")
    return value


def _check_delta(x: object) -> float:
    value = _real("delta", x)
    if not 0.0 < value < 1.0:
        raise malformed(f"delta must be in (0, 1), got {x!r}")
    return value
