"""The root DA's differentially private release: noised primitives, noisy threshold, intervals.

From the merged partial the root measures, with noise calibrated from the declared bounds and
the querier's (epsilon, delta), only the vectors the statistics asked need:

- counts: one entry per group, plus the declines, each drop reason and (when clipping) the
  clipped. Adding or removing one person changes one group entry and at most one other entry
  (clipped) by one: L1 sensitivity 1 (2 when clipping), L2 1 (sqrt 2).
- per field f, centred sums S_f = sum(x_f - c_f), c_f the middle of f's bounds: one person
  moves one entry by at most R_f = (hi_f - lo_f) / 2 (out-of-bounds values were dropped or
  clipped before).
- per field f, centred sums of squares Q_ff = sum((x_f - c_f)^2): sensitivity R_f^2.
- per pair (f, g), for cov, corr and ols, centred cross-products Q_fg = sum((x_f - c_f)(x_g -
  c_g)): sensitivity R_f R_g.
- the histogram of the first field: sensitivity 1.

Groups are disjoint (one person, one group), so each vector costs its share of epsilon once,
whatever the number of groups (parallel composition); the shares, equal, add up (basic
composition) to the query's epsilon (and delta). Everything released is computed from these
noised measurements alone (post-processing, in `derive`): mean = c + S / n, co-moments
C = Q - S S' / n, var = C_ff / (n - 1), cov, corr, and least squares from C. A group is
released only when its *noised* count reaches k — thresholding a noised count is
post-processing too, so k does not undo DP (the groups themselves are the querier's declared,
public bins).

Each statistic carries the standard deviation of its noise and a 95% interval: exact for
counts, from a parametric bootstrap over the released values (more post-processing) for the
others; a regression coefficient's interval adds its sampling error (its standard error, also
released) to the noise's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dispers.core.spec import HISTOGRAM_STATS, AggregateSpec, GroupResult, Privacy, QueryResult, ReleaseInfo
from dispers.protocol.aggregation.derive import derive, finish, needed_fields
from dispers.protocol.aggregation.dp import (
    Noise,
    add_noise,
    calibrate,
    gaussian_sigma,
    interval_halfwidth,
    laplace_scale,
    zcdp_gaussians,
)
from dispers.protocol.aggregation.partial import (
    DROP_REASONS,
    Z95,
    Partial,
    histogram_levels,
    histogram_quantile,
)

FloatArray = npt.NDArray[np.float64]
BOOTSTRAP_DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Plan:
    """The noise of each measured vector (None, or absent, when the statistics asked need no
    such vector): counts, and per field f its centred sums ("sum", f) and centred squares
    ("sq", f), per pair its centred cross-products ("cross", f, g), and the histogram."""

    counts: Noise
    blocks: Mapping[tuple[Any, ...], Noise]
    histogram: Noise | None = None
    accounting: str = "basic"  # how the vectors' costs add up: basic composition, or zCDP

    @property
    def sums(self) -> Noise | None:
        """The first field's sums."""
        return self.blocks.get(("sum", 0))

    @property
    def squares(self) -> Noise | None:
        """The first field's squares."""
        return self.blocks.get(("sq", 0))


def plan_noise(spec: AggregateSpec, privacy: Privacy) -> Plan:
    """Calibrate each vector's noise from the bounds and the query's (epsilon, delta): every
    vector measured gets an equal share (basic composition)."""
    halves = [(hi - lo) / 2 for lo, hi in spec.all_bounds]
    sums, squares, cross = needed_fields(spec)
    need_histogram = any(s in HISTOGRAM_STATS for s in spec.stats)
    blocks: dict[tuple[Any, ...], float] = {}  # block -> sensitivity
    for f in sorted(sums):
        blocks[("sum", f)] = halves[f]
    for f in sorted(squares):
        blocks[("sq", f)] = halves[f] ** 2
    for f, g in sorted(cross):
        blocks[("cross", f, g)] = halves[f] * halves[g]
    shares = 1 + len(blocks) + int(need_histogram)
    epsilon, delta = privacy.epsilon / shares, privacy.delta / shares
    # One person is in one group, and (when clipping) may also be counted as clipped: the count
    # vector's L1 and L2 sensitivities are then 2 and sqrt(2).
    l1, l2 = (2.0, math.sqrt(2.0)) if spec.clip else (1.0, 1.0)
    if privacy.mechanism == "gaussian":
        joint = _zcdp_plan(blocks, l2, need_histogram, privacy)
        # Both are (epsilon, delta)-DP; the joint zCDP calibration wins from about three vectors.
        split = gaussian_sigma(1.0, epsilon, delta / 2)
        if joint.counts.scale / l2 < split:
            return joint
    if privacy.mechanism == "laplace":
        # Discrete Laplace on the integers with scale l1/epsilon is exactly epsilon-DP for counts.
        counts = Noise("laplace", laplace_scale(l1, epsilon), 1.0)
    else:
        # On the integer grid a discrete Gaussian of the continuous calibration spends a few
        # percent more delta than the continuous one at small sigma (CKS20): calibrated to
        # delta / 2, it stays within delta.
        counts = Noise("gaussian", gaussian_sigma(l2, epsilon, delta / 2), 1.0)
    return Plan(
        counts=counts,
        # calibrate() picks a grid fine against both the scale and the sensitivity and accounts
        # for rounding onto it (and for the discrete Gaussian's delta).
        blocks={b: calibrate(privacy.mechanism, sens, epsilon, delta) for b, sens in blocks.items()},
        # One person is in one bin of one group: the histogram has sensitivity 1.
        histogram=(
            Noise("laplace", laplace_scale(1.0, epsilon), 1.0)
            if privacy.mechanism == "laplace"
            else Noise("gaussian", gaussian_sigma(1.0, epsilon, delta / 2), 1.0)
        )
        if need_histogram
        else None,
    )


def _zcdp_plan(
    blocks: Mapping[tuple[Any, ...], float], counts_l2: float, need_histogram: bool, privacy: Privacy
) -> Plan:
    """Gaussian noise for every vector at once, accounted in zCDP (see `zcdp_gaussians`): the
    noise of each grows with the square root of the number of vectors, not with the number."""
    keys = list(blocks)
    sensitivities = [(counts_l2, True), *((blocks[k], False) for k in keys)]
    if need_histogram:
        sensitivities.append((1.0, True))
    noises = zcdp_gaussians(sensitivities, privacy.epsilon, privacy.delta)
    return Plan(
        counts=noises[0],
        blocks=dict(zip(keys, noises[1 : 1 + len(keys)], strict=True)),
        histogram=noises[-1] if need_histogram else None,
        accounting="zcdp",
    )


def noise_std(noise: Noise) -> float:
    """The standard deviation of one noise draw."""
    return math.sqrt(2.0) * noise.scale if noise.mechanism == "laplace" else noise.scale


Measured = dict[tuple[Any, ...], FloatArray]


def _measure(partial: Partial, spec: AggregateSpec, plan: Plan, sample: Sampler) -> Measured:
    """Each block's noised measurement: centred sums and squares and cross-products per group."""
    centres = np.asarray([(lo + hi) / 2 for lo, hi in spec.all_bounds])
    n = partial.count.astype(np.float64)
    dev = partial.mean - centres  # (G, F)
    out: Measured = {}
    for block, noise in plan.blocks.items():
        if block[0] == "sum":
            true = n * dev[:, block[1]]
        else:
            f, g = (block[1], block[1]) if block[0] == "sq" else (block[1], block[2])
            true = partial.co[:, f, g] + n * dev[:, f] * dev[:, g]
        out[block] = sample(true, noise)
    return out


def _moments(spec: AggregateSpec, n: FloatArray, measured: Measured) -> tuple[FloatArray, FloatArray]:
    """(mean, co-moments) per group from noised counts and centred measurements (NaN where a
    measurement was not taken: no statistic asked reads it)."""
    centres = np.asarray([(lo + hi) / 2 for lo, hi in spec.all_bounds])
    f_count = spec.n_fields
    shape = n.shape
    safe = np.maximum(n, 1.0)
    s = np.full((*shape, f_count), np.nan)
    q = np.full((*shape, f_count, f_count), np.nan)
    for block, value in measured.items():
        if block[0] == "sum":
            s[..., block[1]] = value
        elif block[0] == "sq":
            q[..., block[1], block[1]] = value
        else:
            q[..., block[1], block[2]] = q[..., block[2], block[1]] = value
    mean = centres + s / safe[..., None]
    co = q - s[..., :, None] * s[..., None, :] / safe[..., None, None]
    return mean, co


Sampler = Callable[[FloatArray, Noise], FloatArray]


def release_dp(
    partial: Partial,
    spec: AggregateSpec,
    privacy: Privacy,
    *,
    left: tuple[float, float] | None = None,
    sample: Sampler = add_noise,
) -> QueryResult:
    """The noised result of a merged partial (`sample` is replaceable for tests only)."""
    plan = plan_noise(spec, privacy)
    n_groups = partial.n_groups
    true_counts = np.concatenate(
        [
            partial.count.astype(np.float64),
            [float(partial.declined)],
            [float(partial.dropped.get(r, 0)) for r in DROP_REASONS],
            [float(partial.clipped)] if spec.clip else [],
        ]
    )
    counts = np.maximum(np.rint(sample(true_counts, plan.counts)), 0.0)
    n = counts[:n_groups]
    measured = _measure(partial, spec, plan, sample)
    mean, co = _moments(spec, n, measured)
    raw = derive(spec, n, mean, co)
    values = {key: finish(spec, key, r, clip=True) for key, r in raw.items()}
    intervals, stds = _bootstrap(spec, plan, n, measured, raw)
    hist = None
    if plan.histogram is not None and partial.hist is not None:
        noisy = sample(partial.hist.astype(np.float64).reshape(-1), plan.histogram)
        hist = np.maximum(np.rint(noisy), 0.0).reshape(partial.hist.shape)

    groups = []
    for i, label in enumerate(spec.groups):
        if n[i] < spec.k:
            groups.append(GroupResult(label, True, {}))
            continue
        released: dict[str, float | None] = {}
        for key, arr in values.items():
            x = float(arr[i])
            released[key] = int(x) if key == "count" else (None if math.isnan(x) else x)
        bounds = {
            key: (float(lo[i]), float(hi[i]))
            for key, (lo, hi) in intervals.items()
            if released.get(key) is not None and math.isfinite(lo[i]) and math.isfinite(hi[i])
        }
        noise = {
            key: float(sd[i])
            for key, sd in stds.items()
            if released.get(key) is not None and math.isfinite(sd[i])
        }
        histogram: tuple[float, ...] = ()
        if hist is not None:
            if "histogram" in spec.stats:
                histogram = tuple(hist[i].tolist())
            # Quantiles read off the noised histogram (post-processing), to a bin's resolution.
            for key, level in histogram_levels(spec):
                released[key], bounds[key] = histogram_quantile(hist[i], spec.bins, level)
        groups.append(GroupResult(label, False, released, bounds, noise, histogram))

    def under_k(x: float) -> int | None:
        return int(x) if x >= spec.k else None

    released_total = sum(int(n[i]) for i, g in enumerate(groups) if not g.suppressed)
    return QueryResult(
        query_id=spec.query_id,
        k=spec.k,
        groups=tuple(groups),
        contributions=released_total,
        dropped={r: under_k(counts[n_groups + 1 + j]) for j, r in enumerate(DROP_REASONS)},
        declined=under_k(counts[n_groups]),
        clipped=under_k(counts[-1]) if spec.clip else None,
        privacy=ReleaseInfo(
            noised=True,
            mechanism=privacy.mechanism,
            epsilon=privacy.epsilon,
            delta=privacy.delta,
            epsilon_left=None if left is None else left[0],
            delta_left=None if left is None else left[1],
            accounting=plan.accounting,
        ),
    )


def _bootstrap(
    spec: AggregateSpec, plan: Plan, n: FloatArray, measured: Measured, raw: dict[str, FloatArray]
) -> tuple[dict[str, tuple[FloatArray, FloatArray]], dict[str, FloatArray]]:
    """95% intervals and noise standard deviations of each statistic.

    Counts: exact (the mechanism's own interval). Others: a parametric bootstrap that redraws
    the noise around the released measurements and recomputes each statistic; the basic
    bootstrap interval is [v - q(97.5%), v - q(2.5%)] of the deviations. It uses only what is
    released, so it is post-processing; its randomness protects nothing and need not be secure.

    A regression coefficient's interval also holds its sampling error: its half-widths are
    those of the noise and 1.96 standard errors, added in quadrature.
    """
    rng = np.random.default_rng()
    draws_n = BOOTSTRAP_DRAWS if "ols" not in spec.stats else BOOTSTRAP_DRAWS // 2
    shape = (draws_n, len(n))

    def draws(noise: Noise) -> FloatArray:
        if noise.mechanism == "laplace":
            return rng.laplace(0.0, noise.scale, shape)
        return rng.normal(0.0, noise.scale, shape)

    n_star = np.maximum(n + draws(plan.counts), 0.0)
    measured_star = {block: value + draws(plan.blocks[block]) for block, value in measured.items()}
    mean_star, co_star = _moments(spec, n_star, measured_star)
    star = derive(spec, n_star, mean_star, co_star)
    half = interval_halfwidth(plan.counts, LEVEL)
    intervals: dict[str, tuple[FloatArray, FloatArray]] = {}
    stds: dict[str, FloatArray] = {}
    if "count" in raw:
        intervals["count"] = (n - half, n + half)
        stds["count"] = np.full(len(n), noise_std(plan.counts))
    alpha = (1 - LEVEL) / 2
    for key, value in raw.items():
        if key == "count":
            continue
        dev = star[key] - value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # groups with NaN draws
            low, high = np.nanquantile(dev, [alpha, 1 - alpha], axis=0)
            stds[key] = np.nanstd(
                finish(spec, key, star[key], clip=True) - finish(spec, key, value, clip=True), axis=0
            )
        if key.startswith("ols.") and not key.startswith("ols.se.") and key != "ols.r2":
            se = raw[key.replace("ols.", "ols.se.", 1)]
            sampling = Z95 * np.maximum(np.nan_to_num(se), 0.0)
            low = -np.hypot(low, sampling)
            high = np.hypot(high, sampling)
        intervals[key] = (
            finish(spec, key, value - high, clip=True),
            finish(spec, key, value - low, clip=True),
        )
    return intervals, stds
