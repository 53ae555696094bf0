"""GPU energy: measure it, price it, and cut it with Zeus's power limit (NSDI'23).

* :mod:`lit.energy.nvml`: the GPU interface (:class:`NVML`) and its real implementation on
  ``pynvml`` (:class:`PynvmlNVML`).
* :mod:`lit.energy.fake`: a simulated GPU (:class:`FakeNVML`) driven by a :class:`PowerProfile`.
* :mod:`lit.energy.meter`: energy and time of a window of work (:class:`EnergyMeter`).
* :mod:`lit.energy.aggregate`: one job's figures from its processes' (:func:`reduce_over_ranks`).
* :mod:`lit.energy.cost`: Zeus's cost (:func:`zeus_cost`) and a training run's (:func:`run_cost`).
* :mod:`lit.energy.power_limit`: the power-limit optimizer (:class:`PowerLimitOptimizer`).

The Lightning adapters are ``callbacks.EnergyMonitor``, ``callbacks.ZeusCallback``,
``callbacks.SimulatedGPU`` and ``callbacks.BatchSizeTarget``. Names below load their module on
first use, so that ``lit.energy.cost`` (the batch-size command line) imports no torch.
"""

from lit.lazy import lazy_getattr

_LAZY = {
    **dict.fromkeys(["NVML", "NVMLUnavailable", "PynvmlNVML"], "lit.energy.nvml"),
    **dict.fromkeys(["FakeNVML", "PowerProfile", "h200_like_profile"], "lit.energy.fake"),
    **dict.fromkeys(["EnergyMeter", "Measurement", "Reading", "energy_between", "open_device"],
                    "lit.energy.meter"),
    "reduce_over_ranks": "lit.energy.aggregate",
    **dict.fromkeys(["check_eta", "run_cost", "zeus_cost"], "lit.energy.cost"),
    **dict.fromkeys(["Done", "LimitMeasurement", "PowerLimitOptimizer", "Profiling", "Ready", "Warmup",
                     "candidate_limits", "choose_power_limit", "lowest_limit_within_slowdown"],
                    "lit.energy.power_limit"),
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("lit.energy", _LAZY)
