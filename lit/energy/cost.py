"""Zeus's energy-time cost (You, Chung, Chowdhury, NSDI'23, Eq. 2).

    Cost = eta * Energy + (1 - eta) * MaxPower * Time

``eta_knob`` (zeus's name) in [0, 1] weighs energy (J) against time (s, turned into joules by
the highest power the GPUs could draw, ``MaxPower``: the maximum power limit times the number of
GPUs): 1 minimises energy, 0 time. The power-limit optimizer prices one window per limit with
it, the batch-size search a whole run (:func:`run_cost`).
"""

from __future__ import annotations


def check_eta(eta_knob: float, name: str = "eta_knob") -> float:
    """``eta_knob`` itself, or a ValueError naming the field ``name`` when it is outside [0, 1]."""
    if not 0.0 <= eta_knob <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (1: energy only, 0: time only), got {eta_knob!r}")
    return eta_knob


def zeus_cost(energy_j: float, time_s: float, eta_knob: float, max_power_w: float) -> float:
    """``eta_knob * energy_j + (1 - eta_knob) * max_power_w * time_s``, in J."""
    return eta_knob * energy_j + (1.0 - eta_knob) * max_power_w * time_s


def run_cost(energy_j: float | None, time_s: float, eta_knob: float = 0.5,
             max_power_w: float | None = None) -> float:
    """The cost of a training run for the batch-size search: :func:`zeus_cost` in J when its
    energy was measured, else its time in s.

    Without energy (a CPU run, no NVML) the ranking of batch sizes is time-to-accuracy, which is
    what eta 0 gives up to the constant ``MaxPower``. A job's runs must all use the same kind of
    cost; the history records which.

    Args:
        energy_j: energy of the run so far in J, or ``None`` when not measured.
        time_s: training wall time of the run so far, in s.
        eta_knob: weight of energy against time, in [0, 1].
        max_power_w: ``MaxPower`` in W; needed when ``energy_j`` is given.
    """
    check_eta(eta_knob)
    if time_s < 0:
        raise ValueError(f"time_s must be >= 0, got {time_s!r}")
    if energy_j is None:
        return float(time_s)
    if max_power_w is None or max_power_w <= 0:
        raise ValueError(f"max_power_w must be the GPUs' highest power limit in W (> 0) when energy "
                         f"is measured, got {max_power_w!r}")
    return zeus_cost(float(energy_j), float(time_s), eta_knob, float(max_power_w))
