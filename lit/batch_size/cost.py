"""Zeus's energy-time cost of a training run (You, Chung, Chowdhury, NSDI'23, Eq. 2).

    Cost = eta * Energy + (1 - eta) * MaxPower * Time

``eta`` in [0, 1] weighs energy (joules) against time (seconds, turned into joules by the
highest power the GPUs could draw, ``MaxPower``: the maximum power limit times the number of
GPUs). Where no energy is measured (a CPU run, no NVML) the cost is the time in seconds: the
ranking of batch sizes is then time-to-accuracy, which is what eta = 0 gives up to the constant
``MaxPower``. A job's runs must all use the same kind of cost; the history records which.
"""

from __future__ import annotations


def zeus_cost(time_s: float, energy_j: float | None, eta: float = 0.5,
              max_power_w: float | None = None) -> float:
    """The run's cost: joules when ``energy_j`` is measured, else seconds (time only).

    Args:
        time_s: training wall time of the run so far, in seconds.
        energy_j: energy of the run so far in joules, or ``None`` when not measured.
        eta: weight of energy against time, in [0, 1].
        max_power_w: ``MaxPower`` in watts; needed when ``energy_j`` is given.
    """
    check_eta(eta)
    if time_s < 0:
        raise ValueError(f"time_s must be >= 0, got {time_s!r}")
    if energy_j is None:
        return float(time_s)
    if max_power_w is None or max_power_w <= 0:
        raise ValueError(f"max_power_w must be the GPUs' highest power limit in W (> 0) when energy "
                         f"is measured, got {max_power_w!r}")
    return eta * float(energy_j) + (1.0 - eta) * float(max_power_w) * float(time_s)


def check_eta(eta: float) -> float:
    """``eta`` itself, or a ValueError when it is outside [0, 1]."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: time only, 1: energy only), got {eta!r}")
    return eta
