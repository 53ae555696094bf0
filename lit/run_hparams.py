"""One TensorBoard hparams entry per run: what a reader needs to compare runs, nothing internal.

Lightning logs the model's and the datamodule's ``__init__`` arguments as they were captured,
which under the CLI means nested ``class_path`` dicts, no optimizer settings when they came
from ``--optimizer``, nothing about the Trainer, and the CLI's private ``_instantiator``.
:func:`flat_hparams` turns the run's resolved config into flat, readable keys
(``model/backbone``, ``optimizer``, ``optimizer/lr``, ``lr_scheduler/warmup_fraction``,
``data/batch_size``, ``trainer/max_epochs``, ...); :class:`RunHparams` logs them once at fit
start, together with what the model reports about itself after it is built
(``LitModule.extra_hparams()``, e.g. a DLRM's parameter counts and FLOPs).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

TRAINER_KEYS = ("max_epochs", "max_steps", "precision", "devices", "num_nodes",
                "accumulate_grad_batches", "gradient_clip_val", "strategy")


def _leaf(value: object) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _flatten(prefix: str, value: object, out: dict[str, object]) -> None:
    """``{"class_path": p, "init_args": {...}}`` becomes ``prefix = short(p)`` plus its args."""
    if isinstance(value, dict) and "class_path" in value:
        out[prefix] = _short(str(value["class_path"]))
        for key, arg in (value.get("init_args") or {}).items():
            if not str(key).startswith("_"):  # the CLI's private _instantiator
                _flatten(f"{prefix}/{key}", arg, out)
    elif isinstance(value, dict):
        for key, arg in value.items():
            if not str(key).startswith("_"):
                _flatten(f"{prefix}/{key}", arg, out)
    else:
        out[prefix] = _leaf(value)


def flat_hparams(config: dict) -> dict[str, object]:
    """Flat hyperparameters of a resolved ``python -m lit`` config (a plain dict)."""
    out: dict[str, object] = {}
    model = dict(config.get("model") or {})
    init = dict(model.get("init_args") or {})
    # The top-level shortcuts win over the model's own optimizer / scheduler.
    for key in ("optimizer", "lr_scheduler"):
        chosen = config.get(key) or init.get(key)
        init.pop(key, None)
        if chosen:
            _flatten(key, chosen, out)
    _flatten("model", {"class_path": model.get("class_path", "?"), "init_args": init}, out)
    if config.get("data"):
        _flatten("data", config["data"], out)
    trainer = config.get("trainer") or {}
    for key in TRAINER_KEYS:
        if key in trainer:
            out[f"trainer/{key}"] = _leaf(trainer[key])
    if "seed_everything" in config:
        out["seed"] = _leaf(config["seed_everything"])
    return out


class RunHparams(Callback):
    """Log ``hparams`` (plus the model's ``extra_hparams()``) once, at fit start.

    Args:
        hparams: flat hyperparameters, e.g. from :func:`flat_hparams`.
    """

    def __init__(self, hparams: dict[str, object]) -> None:
        self.hparams = dict(hparams)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        extra = getattr(pl_module, "extra_hparams", None)
        values = {**self.hparams, **(extra() if callable(extra) else {})}
        for logger in trainer.loggers:
            logger.log_hyperparams(values)
