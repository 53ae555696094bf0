"""Zeus's batch-size policy across recurring runs, as pure functions of the run history.

You, Chung, Chowdhury, "Zeus: Understanding and Optimizing GPU Energy Consumption of DNN
Training", NSDI'23, §4.2-4.4; reference ml-energy/zeus ``PruningGTSBatchSizeOptimizer``.

1. **Pruning exploration** (:func:`pruning_step`): ``rounds`` rounds (Zeus: 2). Each round starts
   at the default batch size, walks *down* the candidates until one fails to reach the target,
   then *up* from the default until one fails. Sizes that reached the target survive into the
   next round, whose default is the cheapest survivor of the round before.
2. **Gaussian Thompson sampling** (:func:`thompson_choice`) over the survivors with
   reward = -cost: each arm's reward is Gaussian with its precision learnt from the arm's
   (windowed) observations, ``1 / var``; with Zeus's flat prior (precision 0) the posterior of
   the mean reward is N(mean, var / n) (:func:`posterior`). An arm seen fewer than ``min_obs``
   (2) times is explored first.
3. **Early stopping** (:func:`cost_limit`): a run stops once its cost passes beta x the best
   cost of any converged run so far (beta = 2); it is recorded as not converged.

Two rules differ from zeus 0.16's server (``zeus.optimizer.batch_size.server``), both on
purpose (``docs/batch_size.md``, "Where we differ from zeus"):

* the early-stop bound counts converged runs only; zeus's ``ZeusService.update_trial`` lowers
  ``job.min_cost`` with every finished trial, converged or not. A run that missed the target
  paid for nothing: its cost is a lower bound of what its size costs to converge, and beta x it
  can stop the best size before it converges (zeus's own paper simulator,
  ``zeus._legacy.simulate``, also updates its minimum only on runs that reached the target);
* the arms built when pruning ends use the same windowed history as every later pick (the last
  ``window`` observations of each size, concurrent results included), as zeus's legacy
  ``PruningGTSBatchSizeOptimizer._construct_mab`` does; zeus 0.16's ``GaussianTS.construct_mab``
  fits each arm on all its pruning-round trials, with no window and without concurrent trials,
  and applies the window only when that arm is next reported. One rule at every recurrence keeps
  an arm's posterior a function of its last ``window`` costs, whether it was played since
  pruning or not.

Where Zeus keeps generator state in a server, this module replays the history on every call, so
a wrapper process can start, decide and exit: the same history (and seed) gives the same choice.
Decisions that the paper leaves open, taken here:

* observations are replayed in the order runs *finished*; a result whose size is not the one
  pruning expects (a concurrent run) is kept for sampling but does not move pruning on (Zeus's
  ``concurrency=True`` path);
* while the size pruning expects is already running elsewhere, a concurrent caller gets the
  best size known so far (lowest mean cost among converged runs), or the default;
* runs that crashed or were killed have no cost and are not observations; a size that failed
  ``max_failures`` times without ever finishing is dropped from the candidates (e.g. out of
  memory);
* the sampler's generator is seeded by ``(seed, number of observations)``: reproducible series,
  and a different draw at every recurrence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

LrRule = Literal["linear", "sqrt", "none"]


@dataclass(frozen=True)
class Observation:
    """One finished run: its batch size, its cost and whether it reached the target."""

    batch_size: int
    cost: float
    reached: bool


@dataclass(frozen=True)
class Decision:
    """What to run next and why (``phase``: pruning, explore, thompson or concurrent)."""

    batch_size: int
    phase: str
    round: int | None = None
    samples: dict[int, float] = field(default_factory=dict)


class AllPrunedError(ValueError):
    """No candidate batch size reached the target during pruning."""


def check_candidates(batch_sizes: Sequence[int], default: int) -> list[int]:
    """Sorted unique candidates, or a ValueError naming what is wrong."""
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    if default not in sizes:
        raise ValueError(f"the default batch size {default!r} must be one of the candidates "
                         f"{sizes!r}: add it to --batch-sizes or pass --default")
    return sizes


def pruning_step(observations: Sequence[Observation], batch_sizes: Sequence[int], default: int,
                 rounds: int = 2) -> tuple[int, int] | list[int]:
    """Replay pruning exploration over ``observations``.

    Returns ``(batch_size, round)`` to explore next while pruning goes on, or the sorted list
    of surviving batch sizes once the ``rounds`` rounds are over. Raises :class:`AllPrunedError`
    when a round ends with no survivor.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    sizes = check_candidates(batch_sizes, default)
    pending = iter(observations)
    for rnd in range(rounds):
        good: list[int] = []
        best_cost, next_default = math.inf, default
        down = [b for b in reversed(sizes) if b <= default]
        up = [b for b in sizes if b > default]
        for direction in (down, up):
            for bs in direction:
                obs = next((o for o in pending if o.batch_size == bs), None)
                if obs is None:
                    return bs, rnd
                if not obs.reached:
                    break  # this direction is done
                good.append(bs)
                if obs.cost < best_cost:
                    best_cost, next_default = obs.cost, bs
        if not good:
            raise AllPrunedError(f"no batch size reached the target in pruning round {rnd + 1} "
                                 f"of {sizes!r}: lower the target or give the runs more epochs")
        sizes, default = sorted(good), next_default
    return sizes


def rewards_by_arm(observations: Sequence[Observation], arms: Sequence[int],
                   window: int = 0) -> dict[int, np.ndarray]:
    """Each arm's rewards (-cost) in time order, only its last ``window`` ones when > 0.

    Every observation of the arm counts: pruning rounds, concurrent runs and runs that did not
    converge (their cost is what was paid). The window applies from the first pick after
    pruning on (zeus 0.16 skips it for the arms it builds then: see the module docstring).
    """
    out = {}
    for arm in arms:
        rewards = [-o.cost for o in observations if o.batch_size == arm]
        out[arm] = np.asarray(rewards[-window:] if window > 0 else rewards, dtype=np.float64)
    return out


def posterior(rewards: np.ndarray, prior_mean: float = 0.0,
              prior_precision: float = 0.0) -> tuple[float, float]:
    """Posterior (mean, precision) of an arm's mean reward, reward precision = 1 / var(rewards).

    Conjugate Gaussian update with a known reward precision tau estimated from the arm's own
    rewards (population variance, as Zeus): precision = p0 + n tau, mean = (p0 m0 + tau sum r) /
    precision. Identical rewards give an infinite precision (the sample is the mean).
    """
    n = len(rewards)
    if n == 0:
        return prior_mean, prior_precision
    var = float(np.var(rewards))
    if var == 0.0:
        return float(np.mean(rewards)), math.inf
    tau = 1.0 / var
    precision = prior_precision + n * tau
    return (prior_precision * prior_mean + tau * float(np.sum(rewards))) / precision, precision


def thompson_choice(rewards: dict[int, np.ndarray], rng: np.random.Generator,
                    min_obs: int = 2) -> Decision:
    """One Thompson-sampling pick: explore an arm with < ``min_obs`` rewards (random order, as
    Zeus), else sample each arm's mean reward from its posterior and take the largest."""
    arms = sorted(rewards)
    for arm in rng.permutation(arms):
        if len(rewards[int(arm)]) < min_obs:
            return Decision(int(arm), "explore")
    samples = {}
    for arm in arms:
        mean, precision = posterior(rewards[arm])
        samples[arm] = mean if math.isinf(precision) else float(
            rng.normal(mean, 1.0 / math.sqrt(precision)))
    return Decision(max(samples, key=samples.__getitem__), "thompson", samples=samples)


def best_known(observations: Sequence[Observation], default: int) -> int:
    """The batch size with the lowest mean cost among converged runs (``default`` if none)."""
    costs: dict[int, list[float]] = {}
    for o in observations:
        if o.reached:
            costs.setdefault(o.batch_size, []).append(o.cost)
    return min(costs, key=lambda b: np.mean(costs[b])) if costs else default


def next_batch_size(observations: Sequence[Observation], batch_sizes: Sequence[int], default: int,
                    *, seed: int = 0, rounds: int = 2, window: int = 0, min_obs: int = 2,
                    running: Sequence[int] = ()) -> Decision:
    """The batch size for the next recurrence of a job, from its finished runs.

    Args:
        observations: finished runs in the order they finished (crashed runs left out).
        batch_sizes: the candidates.
        default: the batch size pruning starts from (the job's usual one).
        seed: seeds the sampler together with ``len(observations)``.
        rounds: pruning rounds (Zeus: 2).
        window: Thompson sampling uses each arm's last ``window`` observations (0: all).
        min_obs: observations per arm before sampling (Zeus: 2).
        running: batch sizes of runs of this job in flight now.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: no window), got {window!r}")
    if window and window < min_obs:
        raise ValueError(f"window {window!r} must be >= min_obs {min_obs!r} (or 0 for no window)")
    step = pruning_step(observations, batch_sizes, default, rounds)
    if isinstance(step, tuple):
        bs, rnd = step
        if bs in running:
            return Decision(best_known(observations, default), "concurrent", round=rnd)
        return Decision(bs, "pruning", round=rnd)
    rng = np.random.default_rng([seed, len(observations)])
    return thompson_choice(rewards_by_arm(observations, step, window), rng, min_obs)


def cost_limit(observations: Sequence[Observation], beta: float | None) -> float | None:
    """Zeus's early-stop threshold: beta x the lowest cost of a converged run (None: no limit).

    Runs that did not converge (out of budget, or stopped at an earlier limit) do not lower it:
    their cost is a lower bound of what their size would cost to reach the target, not what the
    job costs when it succeeds (zeus 0.16 counts them: see the module docstring). No converged
    run yet: no limit.
    """
    if beta is None:
        return None
    if not beta > 1.0:
        raise ValueError(f"beta must be > 1 (Zeus: 2) or None to disable early stopping, got {beta!r}")
    costs = [o.cost for o in observations if o.reached]
    return beta * min(costs) if costs else None


def scale_lr(lr: float, base_batch_size: int, batch_size: int, rule: LrRule) -> float:
    """The learning rate for ``batch_size`` from the config's ``lr`` at ``base_batch_size``:
    ``linear`` (Goyal et al.), ``sqrt`` (Krizhevsky; Hoffer et al.) or ``none``."""
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"lr rule must be 'linear', 'sqrt' or 'none', got {rule!r}")
