"""Lightning callbacks, one per file, imported on first use (see ``models/__init__.py``).
Select them in YAML under ``trainer.callbacks`` with ``class_path: callbacks.NAME``."""

from lit.lazy import lazy_getattr

_LAZY = {
    "NMPruning": "callbacks.nm_pruning",
    "EvalAtSamples": "callbacks.eval_at_samples",
    "BudgetEvaluator": "callbacks.budget_evaluator",
    "BatchSizeTarget": "callbacks.batch_size_target",
    "RunSummary": "callbacks.run_summary",
    "EnergyMonitor": "callbacks.energy_monitor",
    "ZeusCallback": "callbacks.zeus",
    "SimulatedGPU": "callbacks.simulated_gpu",
    "Int8Eval": "callbacks.int8_eval",
    "OutlierFeatures": "callbacks.outlier_features",
    "Sparse24Eval": "callbacks.sparse24_eval",
    # The framework's own, which `python -m lit fit` adds itself (they live in lit/, which
    # imports nothing from here); listed so that they resolve like every callback.
    "SignalCheckpoint": "lit.signal_checkpoint",
    "RunHparams": "lit.run_hparams",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("callbacks", _LAZY)
