"""The base LightningModule: optimizer and LR-scheduler wiring shared by every model.

Models receive their optimizer and scheduler as callables (``OptimizerCallable`` /
``LRSchedulerCallable``), so YAML selects them with ``class_path`` / ``init_args`` and the CLI's
top-level ``--optimizer`` / ``--lr_scheduler`` shortcuts (see :mod:`lit.cli`) can replace them.
Subclasses own their steps, loss and metrics; they override :meth:`LitModule.optimizer_groups`
to choose which parameters the optimizer sees (e.g. no weight decay on norms and biases, or
only the dense part of a DLRM whose embeddings update inside the backward pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit.checkpoints import CLASS_KEY, class_path
from lit.schedulers import plans_run_length


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode and without autograd for the block, its training mode restored after
    (evaluations that run between training steps, e.g. at sample counts or on a clock)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW(lr=1e-3, weight_decay=0.05): the default when no optimizer is configured."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def decay_groups(module: nn.Module, weight_decay_on_1d: bool = False) -> list[dict]:
    """Split trainable parameters into weight-decay and no-decay groups.

    Biases, norm weights and other 1-D tensors (and timm's ``no_weight_decay()`` names such as
    position embeddings and the class token) get ``weight_decay=0``; the rest keep the
    optimizer's own value. This is the convention of DeiT, Swin and BERT training recipes.
    """
    skip: set[str] = set()
    if hasattr(module, "no_weight_decay"):
        skip = set(module.no_weight_decay())
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if (param.ndim <= 1 and not weight_decay_on_1d) or name in skip or leaf in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class LitModule(LightningModule):
    """Base class: builds the configured optimizer and scheduler.

    Args:
        optimizer: a callable taking parameters (or param groups) and returning an optimizer,
            e.g. ``torch.optim.AdamW`` or ``lit.optim.Adan`` from YAML. Default AdamW(1e-3, wd 0.05).
        lr_scheduler: optional callable taking the optimizer. Schedulers from
            :mod:`lit.schedulers` step per optimizer step and learn the total number of steps
            from the Trainer when it is not given; torch's schedulers step per
            ``lr_scheduler_interval``.
        lr_scheduler_interval: ``"step"`` or ``"epoch"`` for schedulers not from
            :mod:`lit.schedulers` (which always step per optimizer step).
        monitor: the metric that ``ReduceLROnPlateau`` watches.
    """

    #: The strategy ``python -m lit`` runs instead of ``--trainer.strategy ddp`` (a registered
    #: name), for a model that distributes its own layers; None keeps Lightning's DDP. The module
    #: defining the model registers the strategy it names when imported.
    ddp_strategy: str | None = None
    #: The strategy (a registered name) that reads this model's sharded checkpoints (folders,
    #: see :func:`lit.checkpoints.is_sharded_checkpoint`); ``--ckpt_path`` given such a folder
    #: under another strategy fails at once, naming this one. None: the model writes none.
    sharded_checkpoint_strategy: str | None = None

    def __init__(
        self,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "epoch",
        monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.monitor = monitor

    def extra_hparams(self) -> dict[str, float | int | str]:
        """Facts about the built model to log with the run's hyperparameters (override)."""
        return {}

    def optimizer_groups(self) -> list[dict] | list[nn.Parameter]:
        """Parameters (or param groups) handed to the optimizer; override to customise."""
        return decay_groups(self)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over :meth:`optimizer_groups`; override to wrap it (a DLRM
        combines it with the embedding tables' fused optimizer)."""
        return self.optimizer(self.optimizer_groups())

    @override
    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        interval = self.lr_scheduler_interval
        if plans_run_length(scheduler):
            # The length is planned in on_train_start: the Trainer's estimate loads the training
            # data, which here would come before a checkpoint's data position is restored.
            interval = "step"
        config = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the module's class, so a checkpoint given to another config is named."""
        checkpoint[CLASS_KEY] = class_path(self)

    @override
    def on_train_start(self) -> None:
        """Give a schedule without ``total_steps`` the run's length, and plan it again when a
        resumed run has a new length.

        A checkpoint stores the schedule's old length: extending ``max_epochs`` on resume would
        otherwise train at the end of the old schedule (lr 0 for a linear decay to 0).
        """
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs
                      if plans_run_length(c.scheduler)]
        if not schedulers:
            return
        total = int(self.trainer.estimated_stepping_batches)
        for scheduler in schedulers:
            if scheduler.total_steps is None:
                scheduler.plan(total, automatic=True)
            elif scheduler.automatic_length and scheduler.total_steps != total:
                rank_zero_info(f"[lit] the run's length changed: {type(scheduler).__name__} "
                               f"re-planned from {scheduler.total_steps} to {total} optimizer "
                               f"steps, continuing at step {scheduler.last_epoch}")
                scheduler.plan(total, automatic=True)

    def step_schedulers(self, boundary: Literal["step", "epoch"]) -> None:
        """Step the schedulers whose interval is ``boundary``: for modules that optimize manually
        (Lightning steps them itself under automatic optimization)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == boundary and not isinstance(
                    config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config.scheduler.step()
