"""Every released statistic from per-group sufficient statistics: count, mean vector, co-moments.

One function, `derive`, turns (n, mean, C) per group — C the matrix of co-moments
sum((x_f - mean_f)(x_g - mean_g)) — into the statistics a spec asks for. The exact release
(DP off) calls it on the merged partial; the DP release calls it on the noised measurements and
again on each bootstrap draw. Arrays may carry leading batch dimensions (the bootstrap's draws).

Names: with one field the statistics are "count", "mean", "std" ...; with several they are
"hr.mean", "weight.std" ... per field, "cov(hr,weight)" and "corr(hr,weight)" per pair, and for
a regression of y on x1, x2: "ols.intercept", "ols.x1", "ols.x2", their standard errors
"ols.se.intercept", "ols.se.x1", ..., and "ols.r2".

Ordinary least squares from sufficient statistics: with Cxx the co-moments of the regressors and
Cxy their co-moments with y, beta = Cxx^-1 Cxy, intercept = mean_y - beta . mean_x, residual sum
of squares RSS = Cyy - beta . Cxy, sigma^2 = RSS / (n - p - 1), se(beta_j) = sqrt(sigma^2
(Cxx^-1)_jj), se(intercept) = sqrt(sigma^2 (1/n + mean_x' Cxx^-1 mean_x)), R^2 = 1 - RSS / Cyy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dispers.core.spec import FIELD_STATS, PAIR_STATS, AggregateSpec

FloatArray = npt.NDArray[np.float64]
MOMENT_STATS = ("sum", "mean", "var", "std")
"""Per-field statistics computed from the sufficient statistics (min and max are not)."""


def field_key(spec: AggregateSpec, f: int, stat: str) -> str:
    """The name field f's statistic is released under: "mean", or "hr.mean" with several fields."""
    return stat if spec.n_fields == 1 else f"{spec.names[f]}.{stat}"


def pairs(spec: AggregateSpec) -> list[tuple[int, int]]:
    """Every pair of fields (i < j)."""
    return [(i, j) for i in range(spec.n_fields) for j in range(i + 1, spec.n_fields)]


def ols_terms(spec: AggregateSpec) -> tuple[int, list[int]]:
    """(index of y, indices of the regressors)."""
    assert spec.regression is not None
    index = {name: i for i, name in enumerate(spec.names)}
    return index[spec.regression.y], [index[x] for x in spec.regression.x]


def ols_keys(spec: AggregateSpec) -> list[str]:
    """The names of the regression's coefficients (intercept first)."""
    assert spec.regression is not None
    return ["intercept", *spec.regression.x]


def needed_fields(spec: AggregateSpec) -> tuple[set[int], set[int], set[tuple[int, int]]]:
    """Which fields need sums, which need squares, which pairs need cross-products."""
    every = set(range(spec.n_fields))
    sums: set[int] = set()
    squares: set[int] = set()
    cross: set[tuple[int, int]] = set()
    if any(s in ("sum", "mean", "var", "std") for s in spec.stats):
        sums |= every
    if any(s in ("var", "std") for s in spec.stats):
        squares |= every
    if any(s in PAIR_STATS for s in spec.stats):
        sums |= every
        squares |= every
        cross |= set(pairs(spec))
    if "ols" in spec.stats:
        y, xs = ols_terms(spec)
        terms = sorted({y, *xs})
        sums |= set(terms)
        squares |= set(terms)
        cross |= {(a, b) for a in terms for b in terms if a < b}
    return sums, squares, cross


def derive(spec: AggregateSpec, n: FloatArray, mean: FloatArray, co: FloatArray) -> dict[str, FloatArray]:
    """The statistics of each group, raw: NaN where undefined (var of one value, a singular
    regression); std holds the variance (its square root is taken when finishing), so that
    intervals are computed on a scale nearly linear in the noise.

    n: (..., G); mean: (..., G, F); co: (..., G, F, F), symmetric.
    """
    out: dict[str, FloatArray] = {}
    stats = set(spec.stats)
    if "count" in stats:
        out["count"] = n
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = np.where(n >= 2, n - 1.0, np.nan)
        for f in range(spec.n_fields):
            if "sum" in stats:
                out[field_key(spec, f, "sum")] = mean[..., f] * n
            if "mean" in stats:
                out[field_key(spec, f, "mean")] = np.where(n > 0, mean[..., f], np.nan)
            if "var" in stats or "std" in stats:
                var = co[..., f, f] / dof
                if "var" in stats:
                    out[field_key(spec, f, "var")] = var
                if "std" in stats:
                    out[field_key(spec, f, "std")] = var
        names = spec.names
        for i, j in pairs(spec):
            if "cov" in stats:
                out[f"cov({names[i]},{names[j]})"] = co[..., i, j] / dof
            if "corr" in stats:
                denom = np.sqrt(np.maximum(co[..., i, i], 0.0) * np.maximum(co[..., j, j], 0.0))
                out[f"corr({names[i]},{names[j]})"] = np.where(denom > 0, co[..., i, j] / denom, np.nan)
        if "ols" in stats:
            out.update(_ols(spec, n, mean, co))
    return out


def _ols(spec: AggregateSpec, n: FloatArray, mean: FloatArray, co: FloatArray) -> dict[str, FloatArray]:
    y, xs = ols_terms(spec)
    p = len(xs)
    cxx = co[..., xs, :][..., :, xs]  # (..., G, p, p)
    cxy = co[..., xs, y]  # (..., G, p)
    cyy = co[..., y, y]
    mx = mean[..., xs]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # A regressor with no spread (or noise that breaks positive definiteness) gives NaN,
        # never a pseudo-inverse's arbitrary answer.
        sign, logdet = np.linalg.slogdet(cxx)
        scale = np.prod(np.maximum(np.diagonal(cxx, axis1=-2, axis2=-1), 1e-300), axis=-1)
        ok = (sign > 0) & (logdet - np.log(scale) > -30.0) & (n >= p + 2)
        safe = np.where(ok[..., None, None], cxx, np.eye(p))
        inv = np.linalg.inv(safe)
        beta = np.einsum("...ij,...j->...i", inv, cxy)
        intercept = mean[..., y] - np.einsum("...i,...i->...", beta, mx)
        rss = cyy - np.einsum("...i,...i->...", beta, cxy)
        sigma2 = np.maximum(rss, 0.0) / np.maximum(n - p - 1.0, 1.0)
        se_beta = np.sqrt(sigma2[..., None] * np.maximum(np.diagonal(inv, axis1=-2, axis2=-1), 0.0))
        quad = np.einsum("...i,...ij,...j->...", mx, inv, mx)
        se_intercept = np.sqrt(sigma2 * np.maximum(1.0 / np.maximum(n, 1.0) + quad, 0.0))
        r2 = np.where(cyy > 0, 1.0 - rss / cyy, np.nan)
    nan = np.nan
    out: dict[str, FloatArray] = {
        "ols.intercept": np.where(ok, intercept, nan),
        "ols.se.intercept": np.where(ok, se_intercept, nan),
    }
    for k, name in enumerate(ols_keys(spec)[1:]):
        out[f"ols.{name}"] = np.where(ok, beta[..., k], nan)
        out[f"ols.se.{name}"] = np.where(ok, se_beta[..., k], nan)
    out["ols.r2"] = np.where(ok, r2, nan)
    return out


def finish(spec: AggregateSpec, key: str, raw: FloatArray, *, clip: bool) -> FloatArray:
    """A raw statistic as released: the square root of std's variance and, when `clip` (the DP
    release), every statistic brought into its possible range: a mean within its field's bounds,
    a variance within [0, R^2], a covariance within [-R_i R_j, R_i R_j], a correlation and R^2
    within their ranges (monotone maps, so intervals keep their coverage)."""
    bounds = spec.all_bounds
    stat = key.rsplit(".", 1)[-1] if not key.startswith("ols.") else key
    f = spec.names.index(key.split(".", 1)[0]) if spec.n_fields > 1 and stat in FIELD_STATS else 0
    lo, hi = bounds[f]
    half = (hi - lo) / 2
    if stat == "std":
        return np.sqrt(np.clip(raw, 0.0, half * half if clip else None))
    if not clip:
        return raw
    if stat == "mean":
        return np.clip(raw, lo, hi)
    if stat == "var":
        return np.clip(raw, 0.0, half * half)
    if key.startswith("cov("):
        i, j = (spec.names.index(x) for x in key[4:-1].split(","))
        r = (bounds[i][1] - bounds[i][0]) / 2 * (bounds[j][1] - bounds[j][0]) / 2
        return np.clip(raw, -r, r)
    if key.startswith("corr("):
        return np.clip(raw, -1.0, 1.0)
    if key == "ols.r2":
        return np.clip(raw, 0.0, 1.0)
    if key.startswith("ols.se."):
        return np.maximum(raw, 0.0)
    return raw
