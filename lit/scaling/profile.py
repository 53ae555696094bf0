"""Least-squares fit of ``L(x) = alpha * x^(-beta) + gamma`` with profile-likelihood intervals.

For a fixed exponent the law is linear in (alpha, gamma), so the bounded least-squares problem
(alpha >= 0, 0 <= gamma <= max L) has a closed form; the fit minimises the residual sum of
squares S(beta) over a dense grid of beta in [0, 5] (refined between grid points), which finds
the global optimum without starting values. x is divided by its smallest value first.

An interval for a quantity q (beta, gamma, a prediction L(x0), the loss drop over the last
decade of x) is the set of q whose profile ``S_q(q) = min S over the parameters that give q``
stays below ``S_min * (1 + F / (n - 3))``, F the ``confidence`` quantile of F(1, n - 3) (the
profile-t interval of nonlinear regression: Bates & Watts, "Nonlinear Regression Analysis and
Its Applications", 1988, section 6.1). Fixing q and beta leaves one linear parameter, so every
profile is a closed form minimised over the beta grid. The interval is the connected set around
the estimate, found by stepping outward and bisecting on the threshold; where the set reaches an
optimiser bound the interval ends on the bound, and the quantity is not identified by the data.

The paper fits by least squares and gives no intervals; these intervals and the bounds are ours.
Residuals are unweighted: over the narrow loss ranges of a sweep, relative (multiplicative)
noise has an almost constant absolute size.
"""

from __future__ import annotations

import math

import numpy as np

BETA_MAX = 5.0
# beta = 0 exactly (alpha and gamma then merge into a constant) and a log grid above it: the
# relative step is 2%, and the minimum between grid points is refined by a parabola.
BETA_GRID = np.concatenate([[0.0], np.geomspace(1e-3, BETA_MAX, 420)])


class Problem:
    """One curve on the fitting scale: ``t = log(x / x_min)``, so ``(x / x_min)^-beta = e^(-beta t)``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z_grid: np.ndarray | None = None):
        self.x = x
        self.x_min = float(np.min(x))
        self.t = np.log(x / self.x_min)
        self.y = y
        self.n = len(y)
        self.gamma_max = max(float(np.max(y)), 1e-12)
        self.z_grid = np.exp(-BETA_GRID[:, None] * self.t[None, :]) if z_grid is None else z_grid

    def with_y(self, y: np.ndarray) -> "Problem":
        """The same x with other losses (bootstrap resamples reuse the grid of x^-beta)."""
        return Problem(self.x, y, self.z_grid)

    def z(self, beta: np.ndarray) -> np.ndarray:
        return np.exp(-np.asarray(beta, dtype=np.float64)[:, None] * self.t[None, :])


def linear_fit(y: np.ndarray, z: np.ndarray, gamma_max: float):
    """Per row of ``z`` (B, n): argmin over alpha >= 0, 0 <= gamma <= gamma_max of
    ``sum (y - alpha z - gamma)^2``; returns alpha, gamma, sse, each (B,).

    The objective is convex: the optimum is the unconstrained one when feasible, otherwise the
    best of the three boundary edges (alpha = 0, gamma = 0, gamma = gamma_max), each a clipped
    one-dimensional least squares.
    """
    n = y.shape[-1]
    sz, szz = z.sum(1), (z * z).sum(1)
    sy, szy = float(y.sum()), z @ y
    det = szz * n - sz * sz
    safe = np.where(det > 1e-12 * szz * n, det, np.inf)  # beta = 0: z constant, det = 0
    a = (szy * n - sz * sy) / safe
    g = (szz * sy - sz * szy) / safe
    inside = np.isfinite(safe) & (a >= 0) & (g >= 0) & (g <= gamma_max)
    candidates = [
        (np.where(inside, a, 0.0), np.where(inside, g, 0.0), inside),
        (np.zeros_like(sz), np.full_like(sz, min(max(sy / n, 0.0), gamma_max)), None),
        (np.maximum(szy / szz, 0.0), np.zeros_like(sz), None),
        (np.maximum((szy - gamma_max * sz) / szz, 0.0), np.full_like(sz, gamma_max), None),
    ]
    best_a, best_g, best_s = None, None, None
    for ca, cg, ok in candidates:
        s = ((y[None, :] - ca[:, None] * z - cg[:, None]) ** 2).sum(1)
        if ok is not None:
            s = np.where(ok, s, np.inf)
        if best_s is None:
            best_a, best_g, best_s = ca, cg, s
        else:
            take = s < best_s
            best_a, best_g, best_s = (np.where(take, ca, best_a), np.where(take, cg, best_g),
                                      np.where(take, s, best_s))
    return best_a, best_g, best_s


def one_param_sse(r: np.ndarray, w: np.ndarray, lo, hi) -> np.ndarray:
    """min over lo <= c <= hi of ``sum (r - c w)^2`` per row (a quadratic: clip its vertex)."""
    sww = (w * w).sum(-1)
    c = np.where(sww > 0, (r * w).sum(-1) / np.where(sww > 0, sww, 1.0), 0.0)
    c = np.clip(c, lo, hi)
    return ((r - c[..., None] * w) ** 2).sum(-1)


def grid_min(beta: np.ndarray, sse: np.ndarray, evaluate) -> tuple[float, float]:
    """(beta, sse) minimising ``sse`` over the grid, refined at the vertex of the parabola
    through the best grid point and its neighbours (``evaluate(beta) -> sse`` checks it)."""
    i = int(np.argmin(sse))
    best = (float(beta[i]), float(sse[i]))
    if 0 < i < len(beta) - 1 and np.all(np.isfinite(sse[i - 1:i + 2])):
        (b0, b1, b2), (s0, s1, s2) = beta[i - 1:i + 2], sse[i - 1:i + 2]
        den = (b1 - b0) * (s1 - s2) - (b1 - b2) * (s1 - s0)
        if den != 0:
            vertex = b1 - 0.5 * ((b1 - b0) ** 2 * (s1 - s2) - (b1 - b2) ** 2 * (s1 - s0)) / den
            if b0 < vertex < b2:
                s = float(evaluate(vertex))
                if s < best[1]:
                    best = (float(vertex), s)
    return best


def sse_of_beta(p: Problem, beta: float) -> float:
    return float(linear_fit(p.y, p.z(np.array([beta])), p.gamma_max)[2][0])


def fit(p: Problem, polish: bool = True) -> tuple[float, float, float, float]:
    """Global least squares: (alpha on the scaled x, beta, gamma, sse). ``polish`` refines beta
    to 1e-10 between the grid neighbours of the best point (bootstrap refits skip it)."""
    sse = linear_fit(p.y, p.z_grid, p.gamma_max)[2]
    beta, s = grid_min(BETA_GRID, sse, lambda b: sse_of_beta(p, b))
    i = int(np.argmin(sse))
    if polish and 0 < i < len(BETA_GRID) - 1:
        from scipy.optimize import minimize_scalar

        best = minimize_scalar(lambda b: sse_of_beta(p, b), method="bounded",
                               bounds=(BETA_GRID[i - 1], BETA_GRID[i + 1]),
                               options={"xatol": 1e-10})
        if best.fun < s:
            beta = float(best.x)
    a, g, s = linear_fit(p.y, p.z(np.array([beta])), p.gamma_max)
    return float(a[0]), beta, float(g[0]), float(s[0])


# --- profiles: S minimised over everything but the quantity q ----------------------------------

def profile_gamma(p: Problem, gamma: float) -> float:
    """Fix gamma: ``y - gamma = alpha z``, alpha >= 0."""
    if not 0.0 <= gamma <= p.gamma_max:
        return math.inf
    r = p.y[None, :] - gamma
    sse = one_param_sse(r, p.z_grid, 0.0, np.inf)
    return grid_min(BETA_GRID, sse, lambda b: one_param_sse(r[:1], p.z(np.array([b])), 0.0,
                                                            np.inf)[0])[1]


def profile_prediction(p: Problem, t0: float, value: float) -> float:
    """Fix L(x0) = value (t0 = log(x0 / x_min)): gamma = value - alpha z0, so
    ``y - value = alpha (z - z0)`` with gamma kept in [0, gamma_max]."""

    def sse(beta, z):
        z0 = np.exp(-beta * t0)
        lo = np.maximum((value - p.gamma_max) / z0, 0.0)
        hi = value / z0
        out = one_param_sse(p.y[None, :] - value, z - z0[:, None], lo, np.maximum(hi, lo))
        return np.where(hi >= lo, out, np.inf)

    if value < 0:
        return math.inf
    return grid_min(BETA_GRID, sse(BETA_GRID, p.z_grid),
                    lambda b: sse(np.array([b]), p.z(np.array([b])))[0])[1]


def profile_drop(p: Problem, t_lo: float, t_hi: float, drop: float) -> float:
    """Fix the relative drop d = (L(x_a) - L(x_b)) / L(x_a): gamma = alpha c with
    ``c = (z_a - z_b) / d - z_a``, so ``y = alpha (z + c)``, 0 <= alpha c <= gamma_max."""
    if drop == 0.0:  # alpha = 0 or beta = 0: a constant
        return float(linear_fit(p.y, np.ones((1, p.n)), p.gamma_max)[2][0])
    if not 0.0 < drop < 1.0:
        return math.inf

    def sse(beta, z):
        za, zb = np.exp(-beta * t_lo), np.exp(-beta * t_hi)
        c = (za - zb) / drop - za
        hi = np.where(c > 0, p.gamma_max / np.where(c > 0, c, 1.0), 0.0)
        return one_param_sse(np.broadcast_to(p.y, z.shape), z + c[:, None], 0.0, hi)

    return grid_min(BETA_GRID, sse(BETA_GRID, p.z_grid),
                    lambda b: sse(np.array([b]), p.z(np.array([b])))[0])[1]


def threshold(sse_min: float, n: int, confidence: float) -> float:
    """The profile SSE at the interval's ends: ``S_min (1 + F(1, n - 3)_confidence / (n - 3))``."""
    from scipy.special import fdtri  # the F quantile; scipy.stats takes seconds to import

    return sse_min * (1.0 + fdtri(1, n - 3, confidence) / (n - 3))


def profile_interval(profile, estimate: float, lower: float, upper: float, limit: float,
                     step: float) -> tuple[float, float]:
    """The connected set ``{q : profile(q) <= limit}`` around ``estimate`` within [lower, upper]:
    step outward (doubling from ``step``), then bisect on the threshold (scipy's brentq)."""
    from scipy.optimize import brentq

    def excess(q):  # finite, for brentq: outside the feasible set a profile is inf
        return min(profile(q), 1e100) - limit

    ends = []
    for direction, bound in ((-1.0, lower), (1.0, upper)):
        inner, delta, end = estimate, step, None
        while end is None:
            outer = estimate + direction * delta
            if direction * (outer - bound) >= 0:
                end = bound if excess(bound) <= 0 else None
                outer = bound
                if end is not None:
                    break
            if excess(outer) > 0:
                if excess(inner) > 0:  # the estimate itself sits on the threshold (exact data)
                    end = inner
                else:
                    a, b = sorted((inner, outer))
                    end = brentq(excess, a, b, xtol=1e-9 * max(abs(estimate), step), rtol=1e-10)
                break
            inner, delta = outer, 2.0 * delta
        ends.append(float(end))
    return ends[0], ends[1]
