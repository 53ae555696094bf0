"""Zeus's batch-size policy against hand computation: the Gaussian posterior, Thompson sampling
(draw by draw, and its pick frequencies against the closed-form probability), the pruning
exploration order on a scripted table, early-stop threshold, lr rules and the Zeus cost; the two
rules where we differ from zeus 0.16 (the early-stop bound from converged runs only, the window
on the arms built when pruning ends) on hand-worked histories."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lit.batch_size.policy import (AllPrunedError, Observation, cost_limit, next_batch_size,
                                   posterior, pruning_step, rewards_by_arm, scale_lr,
                                   thompson_choice)
from lit.energy.cost import run_cost


def test_posterior_hand_computed() -> None:
    r = np.array([-10.0, -12.0, -14.0])
    # var = (4 + 0 + 4) / 3 = 8/3, tau = 3/8; flat prior: precision n tau = 9/8, mean = mean(r)
    mean, precision = posterior(r)
    assert mean == pytest.approx(-12.0) and precision == pytest.approx(9 / 8)
    # prior N(0, 1/0.5): precision 0.5 + 9/8 = 13/8; mean = (3/8 * -36) / (13/8) = -108/13
    mean, precision = posterior(r, prior_mean=0.0, prior_precision=0.5)
    assert precision == pytest.approx(13 / 8) and mean == pytest.approx(-108 / 13)
    # one or identical observations: infinite precision at the mean (Zeus)
    assert posterior(np.array([-5.0, -5.0])) == (-5.0, math.inf)
    assert posterior(np.array([])) == (0.0, 0.0)


def test_thompson_draws_by_hand() -> None:
    rewards = {32: np.array([-10.0, -14.0]), 64: np.array([-9.0, -13.0, -11.0])}
    decision = thompson_choice(rewards, np.random.default_rng(7))
    # By hand: the exploration pass draws a permutation first, then one normal per arm in order:
    # arm 32 ~ N(-12, 4/2), arm 64 ~ N(-11, (8/3)/3).
    rng = np.random.default_rng(7)
    rng.permutation([32, 64])
    s32 = rng.normal(-12.0, math.sqrt(4 / 2))
    s64 = rng.normal(-11.0, math.sqrt((8 / 3) / 3))
    assert decision.samples == {32: pytest.approx(s32), 64: pytest.approx(s64)}
    assert decision.batch_size == (32 if s32 > s64 else 64) and decision.phase == "thompson"


def test_thompson_pick_frequency_matches_closed_form() -> None:
    rewards = {32: np.array([-10.0, -14.0]), 64: np.array([-9.0, -13.0, -11.0])}
    picks = [thompson_choice(rewards, np.random.default_rng(s)).batch_size for s in range(4000)]
    # P(pick 64) = P(X64 > X32) = Phi((-11 + 12) / sqrt(2 + 8/9))
    expected = 0.5 * (1 + math.erf(1 / math.sqrt(2 + 8 / 9) / math.sqrt(2)))
    assert np.mean(np.array(picks) == 64) == pytest.approx(expected, abs=0.025)


def test_under_observed_arm_is_explored_first() -> None:
    rewards = {32: np.array([-10.0, -14.0]), 64: np.array([-9.0])}
    for seed in range(20):
        assert thompson_choice(rewards, np.random.default_rng(seed)).batch_size == 64


def replay(table: dict[int, list[tuple[float, bool]]], sizes, default, n: int,
           limit=None) -> list[str]:
    """Feed ``table``'s outcomes (per size, in order) to the policy for ``n`` recurrences;
    ``limit(history)``, when given, is the early-stop bound: a run past it stops there."""
    history, seen, out = [], {b: 0 for b in table}, []
    for _ in range(n):
        d = next_batch_size(history, sizes, default, seed=0)
        cost, reached = table[d.batch_size][seen[d.batch_size]]
        seen[d.batch_size] += 1
        bound = limit(history) if limit is not None else None
        if bound is not None and cost > bound:
            cost, reached = bound, False  # stopped, recorded as not converged
        history.append(Observation(d.batch_size, cost, reached))
        out.append(f"{d.batch_size}{'' if reached else '!'}:{d.phase}")
    return out


def test_pruning_order_on_a_scripted_table() -> None:
    sizes = [16, 32, 64, 128, 256]
    table = {16: [(50.0, False)], 32: [(30.0, True), (31.0, True), (29.0, True)],
             64: [(25.0, True), (24.0, True), (26.0, True)],
             128: [(20.0, True), (22.0, True), (21.0, True)], 256: [(60.0, False)]}
    got = replay(table, sizes, 64, 7)
    # Round 1 from 64: down 64, 32, 16 (fails: down is over), up 128, 256 (fails).
    # Round 2 over {32, 64, 128} from the cheapest, 128: down 128, 64, 32; nothing above.
    assert got == ["64:pruning", "32:pruning", "16!:pruning", "128:pruning", "256!:pruning",
                   "128:pruning", "64:pruning"]
    history = [Observation(b, c, r) for b, c, r in
               [(64, 25, True), (32, 30, True), (16, 50, False), (128, 20, True), (256, 60, False),
                (128, 22, True), (64, 24, True), (32, 31, True)]]
    assert pruning_step(history, sizes, 64) == [32, 64, 128]
    assert next_batch_size(history, sizes, 64).phase == "thompson"


def test_early_stop_bound_counts_converged_runs_only() -> None:
    # Hand-worked history, in finishing order (beta = 2):
    #   1. 256 cost 100, reached      2. 512 cost 90, reached
    #   3. 1024 cost 40, NOT reached (ran out of epochs: cheap because it did little)
    history = [Observation(256, 100.0, True), Observation(512, 90.0, True),
               Observation(1024, 40.0, False)]
    # Ours: 2 x min(100, 90) = 180. Zeus 0.16 (min over every finished run): 2 x 40 = 80.
    assert cost_limit(history, 2.0) == pytest.approx(180.0)
    # a run stopped at the bound (cost 180, not converged) leaves it where it was
    assert cost_limit(history + [Observation(512, 180.0, False)], 2.0) == pytest.approx(180.0)
    # before any converged run there is no bound, failures or not
    assert cost_limit(history[2:], 2.0) is None
    assert cost_limit([], 2.0) is None


def test_replay_with_early_stop_a_cheap_failure_does_not_prune_the_best_size() -> None:
    sizes = [256, 512, 1024]
    table = {256: [(100.0, True), (104.0, True)], 512: [(90.0, True), (92.0, True)],
             1024: [(40.0, False)]}
    ours = lambda h: cost_limit(h, 2.0)
    # Round 1 from 256: 256 (no bound yet), up: 512 (bound 200), 1024 fails at 40 (bound 180).
    # Round 2 from the cheapest, 512: bound still 2 x 90 = 180, so 512 (92) and 256 (104)
    # converge; nothing above 512 survived; sampling starts.
    assert replay(table, sizes, 256, 5, limit=ours) == [
        "256:pruning", "512:pruning", "1024!:pruning", "512:pruning", "256:pruning"]
    # Zeus 0.16's bound on the same table: after 1024's 40 it is 2 x 40 = 80, round 2's 512
    # (cost 92) is stopped at 80 and counts as not converged, which ends round 2 with no survivor.
    zeus_rule = lambda h: 2.0 * min(o.cost for o in h) if h else None
    with pytest.raises(AllPrunedError):
        replay(table, sizes, 256, 5, limit=zeus_rule)


def test_arms_built_after_pruning_use_the_window() -> None:
    sizes = [64, 128]
    # Hand-worked history, 3 pruning rounds (each round: 64, then up to 128), all reached:
    #   round 1: 64 cost 10, 128 cost 20; round 2: 64 12, 128 22; round 3: 64 14, 128 30
    history = [Observation(b, c, True) for b, c in
               [(64, 10), (128, 20), (64, 12), (128, 22), (64, 14), (128, 30)]]
    assert pruning_step(history, sizes, 64, rounds=3) == [64, 128]
    # Window 2 (ours, from the first pick on): 64 -> rewards [-12, -14]: mean -13, var 1,
    # precision 2 x 1 = 2; 128 -> [-22, -30]: mean -26, var 16, precision 2 / 16 = 1/8.
    arms = rewards_by_arm(history, sizes, window=2)
    assert arms[64].tolist() == [-12.0, -14.0] and arms[128].tolist() == [-22.0, -30.0]
    assert posterior(arms[64]) == (pytest.approx(-13.0), pytest.approx(2.0))
    assert posterior(arms[128]) == (pytest.approx(-26.0), pytest.approx(1 / 8))
    # Zeus 0.16's construct_mab fits all three pruning trials, whatever the window (ours with
    # window 0): 64 -> mean -12, var 8/3, precision 3 x 3/8 = 9/8; 128 -> mean -24,
    # deviations 4, 2, -6: var 56/3, precision 3 x 3/56 = 9/56.
    arms = rewards_by_arm(history, sizes, window=0)
    assert posterior(arms[64]) == (pytest.approx(-12.0), pytest.approx(9 / 8))
    assert posterior(arms[128]) == (pytest.approx(-24.0), pytest.approx(9 / 56))
    # next_batch_size samples from the windowed posteriors: the generator seeded (5, 6 runs)
    # draws the exploration permutation, then N(-13, 1/2) for 64 and N(-26, 8) for 128.
    d = next_batch_size(history, sizes, 64, seed=5, rounds=3, window=2)
    rng = np.random.default_rng([5, 6])
    rng.permutation([64, 128])
    s64, s128 = rng.normal(-13.0, math.sqrt(1 / 2)), rng.normal(-26.0, math.sqrt(8.0))
    assert d.phase == "thompson" and d.samples == {64: pytest.approx(s64), 128: pytest.approx(s128)}


def test_concurrent_result_joins_its_arm() -> None:
    sizes = [64, 128]
    # Hand-worked history, in finishing order: 64 cost 10 (round 1); while 128 runs for round 1,
    # a concurrent caller gets the best known size, 64, which finishes first at cost 13; then
    # 128 cost 20 (round 1); round 2 from 64: 64 cost 12, 128 cost 22. All reached.
    history = [Observation(b, c, True) for b, c in
               [(64, 10), (64, 13), (128, 20), (64, 12), (128, 22)]]
    assert pruning_step(history[:2], sizes, 64) == (128, 0)  # the concurrent 64 moves nothing
    assert pruning_step(history, sizes, 64) == [64, 128]
    # Ours: arm 64 -> [-10, -13, -12]: mean -35/3, deviations 5/3, -4/3, -1/3, var (25 + 16 +
    # 1) / 27 = 14/9, precision 3 x 9/14 = 27/14; arm 128 -> [-20, -22]: mean -21, precision 2.
    # (Zeus 0.16 builds arm 64 from its two pruning trials only: mean -11, precision 2.)
    arms = rewards_by_arm(history, sizes)
    assert arms[64].tolist() == [-10.0, -13.0, -12.0]
    assert posterior(arms[64]) == (pytest.approx(-35 / 3), pytest.approx(27 / 14))
    assert posterior(arms[128]) == (pytest.approx(-21.0), pytest.approx(2.0))


def test_default_failing_goes_straight_up_and_all_pruned_is_an_error() -> None:
    sizes = [32, 64, 128]
    history = [Observation(64, 90.0, False)]
    assert pruning_step(history, sizes, 64) == (128, 0)
    history += [Observation(128, 90.0, False)]
    with pytest.raises(AllPrunedError, match="lower the target"):
        pruning_step(history, sizes, 64)


def test_concurrent_results_do_not_move_pruning_and_in_flight_size_is_not_doubled() -> None:
    sizes = [32, 64, 128]
    # a run of 128 (concurrent) finished first; pruning still expects 64
    history = [Observation(128, 10.0, True)]
    assert pruning_step(history, sizes, 64) == (64, 0)
    d = next_batch_size(history, sizes, 64, running=[64])
    assert (d.batch_size, d.phase) == (128, "concurrent")  # best known meanwhile
    assert next_batch_size([], sizes, 64, running=[64]).batch_size == 64  # nothing known: default


def test_window_keeps_each_arms_last_observations() -> None:
    obs = [Observation(32, c, True) for c in (1, 2, 3, 4)] + [Observation(64, 9, False)]
    got = rewards_by_arm(obs, [32, 64], window=2)
    assert got[32].tolist() == [-3.0, -4.0] and got[64].tolist() == [-9.0]
    assert rewards_by_arm(obs, [32], window=0)[32].tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_series_is_reproducible_by_seed() -> None:
    history = [Observation(b, c, True) for b, c in
               [(64, 25), (32, 30), (128, 20), (128, 26), (64, 24), (32, 31)]]
    picks = lambda seed: [next_batch_size(history[:6] + [Observation(64, 20 + k, True)] * k,
                                          [32, 64, 128], 64, seed=seed).batch_size
                          for k in range(12)]
    assert picks(3) == picks(3)
    assert any(picks(s) != picks(3) for s in range(4, 10))


def test_cost_limit_and_lr_rules_and_zeus_cost() -> None:
    obs = [Observation(32, 30.0, True), Observation(64, 12.0, False), Observation(128, 20.0, True)]
    assert cost_limit(obs, 2.0) == 40.0  # beta x best *converged* cost
    assert cost_limit([Observation(32, 5.0, False)], 2.0) is None
    assert cost_limit(obs, None) is None
    assert scale_lr(0.002, 128, 512, "linear") == pytest.approx(0.008)
    assert scale_lr(0.002, 128, 512, "sqrt") == pytest.approx(0.004)
    assert scale_lr(0.002, 128, 32, "none") == 0.002
    # Zeus Eq. 2: eta E + (1 - eta) MaxPower T
    assert run_cost(3000.0, 10.0, eta_knob=0.5, max_power_w=700.0) == pytest.approx(0.5 * 3000 + 0.5 * 7000)
    assert run_cost(3000.0, 10.0, eta_knob=1.0, max_power_w=700.0) == pytest.approx(3000.0)
    assert run_cost(None, 10.0) == 10.0  # time only


@pytest.mark.parametrize("call, match", [
    (lambda: next_batch_size([], [32, 64], 128), "default batch size 128"),
    (lambda: next_batch_size([], [0, 64], 64), "positive integers"),
    (lambda: next_batch_size([], [32, 64], 64, window=1), "window 1 must be >= min_obs"),
    (lambda: pruning_step([], [32, 64], 64, rounds=0), "rounds must be >= 1"),
    (lambda: cost_limit([], 1.0), "beta must be > 1"),
    (lambda: scale_lr(0.1, 32, 64, "cubic"), "lr rule"),
    (lambda: run_cost(5.0, 1.0, eta_knob=1.5, max_power_w=700.0), "eta_knob must be in"),
    (lambda: run_cost(5.0, 1.0, eta_knob=0.5), "max_power_w"),
])
def test_bad_arguments_are_rejected(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()
