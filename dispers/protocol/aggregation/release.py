"""The root DA's differentially private release: noised primitives, noisy threshold, intervals.

From the merged partial the root measures, with noise calibrated from the declared bounds and
the querier's (epsilon, delta), at most three vectors:

- counts: one entry per group, plus the declines and each drop reason. Adding or removing one
  person changes exactly one entry by one: L1 (and L2) sensitivity 1.
- centred sums S_g = sum(v - c), c the middle of the bounds: one person moves one entry by at
  most R = (hi - lo) / 2 (values outside the bounds were dropped before).
- centred sums of squares Q_g = sum((v - c)^2): sensitivity R^2.

Groups are disjoint (one person, one group), so each vector costs its share of epsilon once,
whatever the number of groups (parallel composition); the shares add up (basic composition)
to the query's epsilon (and delta). Everything released is computed from these noised
measurements alone (post-processing): count, sum = S + c n, mean = c + S / n,
var = (Q - S^2 / n) / (n - 1) clipped to [0, R^2], std. A group is released only when its
*noised* count reaches k — thresholding a noised count is post-processing too, so k does not
undo DP (the groups themselves are the querier's declared, public bins).

Each statistic carries the standard deviation of its noise and a 95% interval: exact for
counts, from a parametric bootstrap over the released values (more post-processing) for the
others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dispers.core.spec import HISTOGRAM_STATS, AggregateSpec, GroupResult, Privacy, QueryResult, ReleaseInfo
from dispers.protocol.aggregation.dp import (
    Noise,
    add_noise,
    calibrate,
    gaussian_sigma,
    interval_halfwidth,
    laplace_scale,
)
from dispers.protocol.aggregation.partial import DROP_REASONS, Partial, histogram_levels, histogram_quantile

FloatArray = npt.NDArray[np.float64]
BOOTSTRAP_DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Plan:
    """The noise of each measured vector (None when the statistics asked need no such vector)."""

    counts: Noise
    sums: Noise | None
    squares: Noise | None
    histogram: Noise | None = None


def plan_noise(spec: AggregateSpec, privacy: Privacy) -> Plan:
    """Calibrate each vector's noise from the bounds and the query's (epsilon, delta)."""
    lo, hi = spec.bounds
    half = (hi - lo) / 2
    need_sums = any(s in ("sum", "mean", "var", "std") for s in spec.stats)
    need_squares = any(s in ("var", "std") for s in spec.stats)
    need_histogram = any(s in HISTOGRAM_STATS for s in spec.stats)
    shares = 1 + int(need_sums) + int(need_squares) + int(need_histogram)
    epsilon, delta = privacy.epsilon / shares, privacy.delta / shares

    if privacy.mechanism == "laplace":
        # Discrete Laplace on the integers with scale 1/epsilon is exactly epsilon-DP for counts.
        counts = Noise("laplace", laplace_scale(1.0, epsilon), 1.0)
    else:
        # On the integer grid a discrete Gaussian of the continuous calibration spends a few
        # percent more delta than the continuous one at small sigma (CKS20): calibrated to
        # delta / 2, it stays within delta.
        counts = Noise("gaussian", gaussian_sigma(1.0, epsilon, delta / 2), 1.0)
    return Plan(
        counts=counts,
        # One person is in one bin of one group: the histogram, like the counts, has sensitivity 1.
        histogram=counts if need_histogram else None,
        # calibrate() picks a grid fine against both the scale and the sensitivity and accounts
        # for rounding onto it (and for the discrete Gaussian's delta).
        sums=calibrate(privacy.mechanism, half, epsilon, delta) if need_sums else None,
        squares=calibrate(privacy.mechanism, half * half, epsilon, delta) if need_squares else None,
    )


def noise_std(noise: Noise) -> float:
    """The standard deviation of one noise draw."""
    return math.sqrt(2.0) * noise.scale if noise.mechanism == "laplace" else noise.scale


def _raw(
    spec: AggregateSpec, n: FloatArray, s: FloatArray | None, q: FloatArray | None
) -> dict[str, FloatArray]:
    """The statistics from (noised) counts, centred sums and centred squares, before they are
    brought into their possible range: intervals are computed on this scale, where each is
    nearly linear in the noise, then mapped by `_finish` (monotone), which keeps coverage."""
    lo, hi = spec.bounds
    centre = (lo + hi) / 2
    out: dict[str, FloatArray] = {"count": n}
    safe_n = np.maximum(n, 1.0)
    if s is not None:
        out["sum"] = s + centre * n
        out["mean"] = centre + s / safe_n
    if s is not None and q is not None:
        out["var"] = (q - s * s / safe_n) / np.maximum(n - 1.0, 1.0)
        out["std"] = out["var"]  # the square root is taken in _finish
    return out


def _finish(spec: AggregateSpec, stat: str, raw: FloatArray) -> FloatArray:
    """A raw statistic in its possible range: mean within the bounds, var within [0, R^2]."""
    lo, hi = spec.bounds
    half = (hi - lo) / 2
    if stat == "mean":
        return np.clip(raw, lo, hi)
    if stat == "var":
        return np.clip(raw, 0.0, half * half)
    if stat == "std":
        return np.sqrt(np.clip(raw, 0.0, half * half))
    return raw


def release_dp(
    partial: Partial,
    spec: AggregateSpec,
    privacy: Privacy,
    *,
    left: tuple[float, float] | None = None,
    sample: Callable[[FloatArray, Noise], FloatArray] = add_noise,
) -> QueryResult:
    """The noised result of a merged partial (`sample` is replaceable for tests only)."""
    plan = plan_noise(spec, privacy)
    lo, hi = spec.bounds
    centre = (lo + hi) / 2
    n_groups = partial.n_groups
    true_counts = np.concatenate(
        [
            partial.count.astype(np.float64),
            [float(partial.declined)],
            [float(partial.dropped.get(r, 0)) for r in DROP_REASONS],
        ]
    )
    counts = np.maximum(np.rint(sample(true_counts, plan.counts)), 0.0)
    n = counts[:n_groups]
    sums = squares = None
    if plan.sums is not None:
        dev = partial.mean - centre
        sums = sample(partial.count * dev, plan.sums)
        if plan.squares is not None:
            squares = sample(partial.m2 + partial.count * dev * dev, plan.squares)
    raw = _raw(spec, n, sums, squares)
    values = {stat: _finish(spec, stat, r) for stat, r in raw.items()}
    intervals, stds = _bootstrap(spec, plan, n, sums, squares, raw)
    hist = None
    if plan.histogram is not None and partial.hist is not None:
        noisy = sample(partial.hist.astype(np.float64).reshape(-1), plan.histogram)
        hist = np.maximum(np.rint(noisy), 0.0).reshape(partial.hist.shape)

    groups = []
    for i, label in enumerate(spec.groups):
        if n[i] < spec.k:
            groups.append(GroupResult(label, True, {}))
            continue
        moments = [st for st in spec.stats if st in values]
        released: dict[str, float | None] = {
            st: (int(values[st][i]) if st == "count" else float(values[st][i])) for st in moments
        }
        bounds = {st: (float(intervals[st][0][i]), float(intervals[st][1][i])) for st in moments}
        histogram: tuple[float, ...] = ()
        if hist is not None:
            if "histogram" in spec.stats:
                histogram = tuple(hist[i].tolist())
            # Quantiles read off the noised histogram (post-processing), to a bin's resolution.
            for key, level in histogram_levels(spec):
                released[key], bounds[key] = histogram_quantile(hist[i], spec.bins, level)
        groups.append(
            GroupResult(label, False, released, bounds, {st: float(stds[st][i]) for st in moments}, histogram)
        )

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
        privacy=ReleaseInfo(
            noised=True,
            mechanism=privacy.mechanism,
            epsilon=privacy.epsilon,
            delta=privacy.delta,
            epsilon_left=None if left is None else left[0],
            delta_left=None if left is None else left[1],
        ),
    )


def _bootstrap(
    spec: AggregateSpec,
    plan: Plan,
    n: FloatArray,
    sums: FloatArray | None,
    squares: FloatArray | None,
    raw: dict[str, FloatArray],
) -> tuple[dict[str, tuple[FloatArray, FloatArray]], dict[str, FloatArray]]:
    """95% intervals and noise standard deviations of each statistic.

    Counts: exact (the mechanism's own interval). Others: a parametric bootstrap that redraws
    the noise around the released measurements and recomputes each statistic; the basic
    bootstrap interval is [v - q(97.5%), v - q(2.5%)] of the deviations. It uses only what is
    released, so it is post-processing; its randomness protects nothing and need not be secure.
    """
    rng = np.random.default_rng()
    shape = (BOOTSTRAP_DRAWS, len(n))

    def draws(noise: Noise) -> FloatArray:
        if noise.mechanism == "laplace":
            return rng.laplace(0.0, noise.scale, shape)
        return rng.normal(0.0, noise.scale, shape)

    n_star = np.maximum(n + draws(plan.counts), 0.0)
    s_star = None if sums is None or plan.sums is None else sums + draws(plan.sums)
    q_star = None if squares is None or plan.squares is None else squares + draws(plan.squares)
    star = _raw(spec, n_star, s_star, q_star)
    half = interval_halfwidth(plan.counts, LEVEL)
    intervals: dict[str, tuple[FloatArray, FloatArray]] = {"count": (n - half, n + half)}
    stds: dict[str, FloatArray] = {"count": np.full(len(n), noise_std(plan.counts))}
    alpha = (1 - LEVEL) / 2
    for stat, value in raw.items():
        if stat == "count" or stat not in spec.stats:  # only what is released
            continue
        dev = star[stat] - value
        low, high = np.quantile(dev, [alpha, 1 - alpha], axis=0)
        intervals[stat] = (_finish(spec, stat, value - high), _finish(spec, stat, value - low))
        stds[stat] = (_finish(spec, stat, star[stat]) - _finish(spec, stat, value)).std(axis=0)
    return intervals, stds
