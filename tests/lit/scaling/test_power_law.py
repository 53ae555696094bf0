"""lit.scaling.power_law and lit.scaling.profile: the bounded linear step against scipy's
lsq_linear, the global fit against scipy's least_squares, every interval end against an SLSQP
re-derivation of the constrained least squares there, coverage on known power laws (fast and
``slow``), and the "not identified" and "out of steam" verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import least_squares, lsq_linear, minimize
from scipy.stats import f as f_dist

from lit.scaling import profile as P
from lit.scaling.power_law import fit_power_law

# (x, alpha, beta, gamma): the synthetic study's test-NE data curve (beta 0.36, gamma 83% of L,
# 1.5 decades) and a steeper one over 2 decades; 10 log-spaced points, like a sweep's axis.
STUDY = (np.geomspace(1.6e4, 5.2e5, 10), 5.753, 0.364, 0.806)
STEEP = (np.geomspace(1e3, 1e5, 10), 0.3 * 1e3 ** 0.5, 0.5, 0.7)
GENTLE = (np.geomspace(1e4, 1e6, 10), 0.1 * 1e4 ** 0.3, 0.3, 0.9)


def law(x, alpha, beta, gamma):
    return alpha * np.power(x, -beta) + gamma


def noisy(setting, noise, seed):
    x, alpha, beta, gamma = setting
    rng = np.random.default_rng(seed)
    return x, law(x, alpha, beta, gamma) * (1.0 + noise * rng.standard_normal(len(x)))


def true_drop(setting):
    x, alpha, beta, gamma = setting
    hi, lo = law(np.array([x.max() / 10.0, x.max()]), alpha, beta, gamma)
    return (hi - lo) / hi


@pytest.mark.parametrize("y", [
    np.array([1.0, 0.9, 0.85, 0.83, 0.82, 0.815]),   # interior optimum
    np.array([0.8, 0.82, 0.85, 0.9, 0.95, 1.0]),     # rising: alpha = 0
    np.array([3.0, 1.0, 0.4, 0.2, 0.12, 0.1]),        # steep to ~0: gamma = 0 binds
    np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
])
def test_bounded_linear_step_matches_lsq_linear(y):
    t = np.log(np.geomspace(1, 1e3, 6))
    betas = np.array([0.0, 0.05, 0.4, 1.3, 5.0])
    z = np.exp(-betas[:, None] * t[None, :])
    alpha, gamma, sse = P.linear_fit(y, z, float(y.max()))
    for i in range(len(betas)):
        ref = lsq_linear(np.stack([z[i], np.ones_like(t)], axis=1), y,
                         bounds=([0.0, 0.0], [np.inf, float(y.max())]), tol=1e-14)
        assert sse[i] == pytest.approx(2 * ref.cost, rel=1e-7, abs=1e-14)
        if betas[i] > 0:  # at beta = 0, alpha and gamma merge: only their sum is defined
            assert (alpha[i], gamma[i]) == pytest.approx(tuple(ref.x), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("setting, noise, seed", [(STUDY, 0.004, 0), (STEEP, 0.02, 3),
                                                  (GENTLE, 0.01, 7)], ids=["study", "steep", "gentle"])
def test_global_fit_is_the_least_squares_optimum(setting, noise, seed):
    x, y = noisy(setting, noise, seed)
    fit = fit_power_law(x, y)
    xs = x / x.min()
    best = None
    for start in ([0.2, 0.1, 0.5 * y.min()], [0.2, 0.5, 0.9 * y.min()], [1.0, 1.5, 0.0],
                  [0.01, 3.0, 0.99 * y.min()]):
        ref = least_squares(lambda p: law(xs, *p) - y, start, xtol=1e-15, ftol=1e-15, gtol=1e-15,
                            bounds=([0, 0, 0], [np.inf, 5.0, y.max()]), max_nfev=20000)
        if best is None or ref.cost < best.cost:
            best = ref
    assert fit.rmse ** 2 * len(x) <= 2 * best.cost * (1 + 1e-9)
    assert fit.beta == pytest.approx(best.x[1], rel=1e-4)
    assert fit.gamma == pytest.approx(best.x[2], rel=1e-5)
    assert fit.alpha == pytest.approx(best.x[0] * x.min() ** best.x[1], rel=1e-3)


def _constrained_sse(x, y, quantity, value):
    """min SSE subject to quantity(alpha_s, beta, gamma) = value, by SLSQP from several starts
    (x scaled to start at 1; alpha_s for the scaled x)."""
    xs = x / x.min()
    best = math.inf
    for start in ([0.2, 0.3, 0.8 * y.min()], [0.5, 0.1, 0.5 * y.min()], [0.1, 1.0, 0.95 * y.min()],
                  [1.0, 0.05, 0.1 * y.min()]):
        res = minimize(lambda p: float(np.sum((law(xs, *p) - y) ** 2)), start, method="SLSQP",
                       bounds=[(0, None), (0, 5.0), (0, float(y.max()))],
                       constraints=[{"type": "eq", "fun": lambda p: quantity(xs, *p) - value}],
                       options={"ftol": 1e-16, "maxiter": 2000})
        if res.success and abs(quantity(xs, *res.x) - value) < 1e-8:
            best = min(best, float(res.fun))
    return best


def _drop(xs, a, b, g):
    hi, lo = law(np.array([xs.max() / 10.0, xs.max()]), a, b, g)
    return (hi - lo) / hi if hi > 0 else 0.0


QUANTITIES = {
    "beta": (lambda xs, a, b, g: b, lambda f: f.beta_ci),
    "gamma": (lambda xs, a, b, g: g, lambda f: f.gamma_ci),
    "drop": (_drop, lambda f: f.drop_ci),
    "L(x_mid)": (lambda xs, a, b, g: law(np.sqrt(xs.max()), a, b, g),
                 lambda f: tuple(v[0] for v in f.predict_interval([np.sqrt(f.x.min() * f.x.max())]))),
}


@pytest.mark.parametrize("name", list(QUANTITIES))
def test_interval_ends_are_where_the_constrained_sse_reaches_the_f_threshold(name):
    """Bates & Watts' profile interval, re-derived: at each end the least SSE with the quantity
    held there equals S_min (1 + F(1, n-3; 0.95) / (n-3)), and just outside it is larger."""
    x, y = noisy(STUDY, 0.004, 0)
    fit = fit_power_law(x, y)
    quantity, interval = QUANTITIES[name]
    limit = fit.rmse ** 2 * len(x) * (1 + f_dist.ppf(0.95, 1, len(x) - 3) / (len(x) - 3))
    lo, hi = interval(fit)
    assert lo < hi
    width = hi - lo
    for end, outward in ((lo, -1.0), (hi, 1.0)):
        assert _constrained_sse(x, y, quantity, end) == pytest.approx(limit, rel=2e-3)
        assert _constrained_sse(x, y, quantity, end + outward * 0.03 * width) > limit * 1.002


def test_exact_law_reproduces_parameters_and_original_x_units():
    x = np.array([3e5, 1e6, 3e6, 1e7, 3e7])
    fit = fit_power_law(x, law(x, 5e3, 0.7, 0.1))
    assert (fit.alpha, fit.beta, fit.gamma) == pytest.approx((5e3, 0.7, 0.1), rel=1e-6)
    assert fit.predict([2e6])[0] == pytest.approx(5e3 * 2e6 ** -0.7 + 0.1, rel=1e-8)
    assert fit.identified and fit.beta_ci == pytest.approx((0.7, 0.7), rel=1e-6)


def _coverage(setting, noise, seeds):
    truth = (setting[2], setting[3], true_drop(setting))
    hits = np.zeros(3)
    for seed in range(seeds):
        fit = fit_power_law(*noisy(setting, noise, seed))
        hits += [lo <= v <= hi for v, (lo, hi) in zip(truth, (fit.beta_ci, fit.gamma_ci, fit.drop_ci))]
    return hits / seeds


@pytest.mark.parametrize("setting, noise", [(STUDY, 0.004), (STEEP, 0.02)],
                         ids=["study-0.4%", "steep-2%"])
def test_intervals_cover_known_laws_near_nominal_fast(setting, noise):
    # 80 seeds: at a true 0.95, below 0.88 has probability 0.3% (binomial); the percentile
    # bootstrap this replaced covered 0.86-0.92 here (200 seeds, benchmarks/scaling_coverage.py).
    # At least one miss (<= 0.99): the intervals are not vacuous.
    cover = _coverage(setting, noise, 80)
    assert np.all(cover >= 0.88) and np.all(cover <= 0.99), cover


@pytest.mark.slow
@pytest.mark.parametrize("setting, noise", [(STUDY, 0.004), (STUDY, 0.01), (STEEP, 0.004),
                                            (STEEP, 0.02), (GENTLE, 0.004)],
                         ids=["study-0.4%", "study-1%", "steep-0.4%", "steep-2%", "gentle-0.4%"])
def test_intervals_cover_known_laws_near_nominal(setting, noise):
    cover = _coverage(setting, noise, 200)  # binomial sd at 0.95: 0.015
    assert np.all(cover >= 0.90) and np.all(cover <= 0.99), cover


def test_clean_power_law_is_identified_and_its_intervals_cover_the_truth():
    x, y = noisy(STUDY, 0.004, 0)
    fit = fit_power_law(x, y)
    assert fit.identified and fit.reason == ""
    assert fit.beta_ci[0] < STUDY[2] < fit.beta_ci[1]
    assert fit.gamma_ci[0] < STUDY[3] < fit.gamma_ci[1]
    assert fit.drop_ci[0] < true_drop(STUDY) < fit.drop_ci[1]
    assert fit.out_of_steam(0.005) == ("no", "")


def test_flat_curve_is_not_identified_and_out_of_steam_for_lack_of_gain():
    x = np.geomspace(1e5, 1e8, 10)
    rng = np.random.default_rng(0)
    fit = fit_power_law(x, 0.47 * (1 + 0.002 * rng.standard_normal(10)))
    assert not fit.identified
    assert "beta not identified (95% interval reaches bound 0 and 5)" in fit.reason
    verdict, why = fit.out_of_steam(0.005)
    assert verdict == "yes" and fit.drop_ci[1] < 0.005
    assert why == f"gain over the last 10x < 0.5% (95% CI upper bound {100 * fit.drop_ci[1]:.2f}%)"
    rising = fit_power_law(x, np.linspace(0.8, 0.9, 10))
    assert rising.reason == "beta not identified (estimate at bound 0: the best fit is flat)"


def test_beta_running_to_the_upper_bound_is_not_identified():
    x = np.geomspace(1e4, 1e6, 10)
    rng = np.random.default_rng(1)
    fit = fit_power_law(x, np.r_[1.0, np.full(9, 0.9)] * (1 + 0.001 * rng.standard_normal(10)))
    assert fit.beta == 5.0 and not fit.identified
    assert fit.reason.startswith("beta not identified (estimate at bound 5)")


def test_few_points_cannot_tell_and_say_why():
    # the synthetic study's top-MLP (M) test NE: 4 points, no trend
    fit = fit_power_law([6489, 15825, 58929, 323505], [0.8883, 0.8828, 0.8824, 0.8947])
    verdict, why = fit.out_of_steam(0.005)
    assert not fit.identified and verdict == "cannot tell"
    assert why.startswith(fit.reason + "; gain over the last 10x 0.00-")
    assert why.endswith("(95% CI) includes < 0.5%")


def test_bootstrap_samples_are_refits_of_the_resampled_curve():
    x, y = noisy(STUDY, 0.004, 0)
    fit = fit_power_law(x, y, bootstrap=50, seed=0)
    assert fit.boot.shape == (50, 3) and np.all(np.isfinite(fit.boot))
    # the first resample, rebuilt by hand and refitted by scipy, gives the same beta
    xs = x / x.min()
    fitted = fit.predict(x)
    residuals = (y - fitted) * math.sqrt(10 / 7)
    resampled = fitted + np.random.default_rng(0).choice(residuals, size=10, replace=True)
    ref = least_squares(lambda p: law(xs, *p) - resampled, [fit.alpha * x.min() ** -fit.beta,
                        fit.beta, fit.gamma], bounds=([0, 0, 0], [np.inf, 5.0, resampled.max()]),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert fit.boot[0, 1] == pytest.approx(ref.x[1], rel=2e-3)
    assert fit.boot[0, 0] == pytest.approx(ref.x[0] * x.min() ** ref.x[1], rel=2e-2)


@pytest.mark.parametrize("x, y, kwargs, match", [
    ([1, 2, 3], [3, 2, 1], {}, "too few points"),
    ([1, 2, 3, 4], [3, 2, float("nan"), 1], {}, "finite"),
    ([0, 2, 3, 4], [3, 2, 1.5, 1], {}, "> 0"),
    ([1, 1, 2, 2], [3, 2, 1.5, 1], {}, "3 distinct x"),
    ([1, 2, 3, 4], [3, 2, 1.5, 1], {"confidence": 95}, "confidence must be in"),
    ([1, 2, 3, 4], [3, 2, 1.5, 1], {"bootstrap": -1}, "bootstrap must be >= 0"),
])
def test_fit_rejects_bad_input(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y, **kwargs)
