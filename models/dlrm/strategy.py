"""A Lightning DDP strategy for torchrec models: processes and process group from Lightning,
model parallelism from torchrec, checkpoints through ``torch.distributed.checkpoint``.

Lightning's ``DDPStrategy`` wraps the LightningModule in ``DistributedDataParallel``. A torchrec
model already is distributed: ``DistributedModelParallel`` shards the embedding tables across
ranks (their gradients never leave the fused backward) and wraps only the dense part in DDP
itself. Wrapping it again would all-reduce embedding gradients densely, the problem reported in
torchrec issues #106 and #3114. This strategy keeps everything of ``DDPStrategy`` (launching,
process group, rank-zero logging, metric reduction) except that wrapping, and by default writes
sharded checkpoints: each rank saves its own shards of the tables and of the fused optimizer's
state with ``torch.distributed.checkpoint`` (DCP), so no rank ever gathers a whole table. DCP
re-shards on load, so such a checkpoint resumes on another number of GPUs or another plan.

After a run (fit, validate, test) the module stays where it trained: Lightning's strategies copy
the module and the optimizer state to the CPU at teardown, which for a DLRM is every table (GBs)
through the host, once after ``fit`` and again after the ``test`` that follows it, and the test
copies them back first. ``teardown_to_cpu=True`` restores Lightning's behaviour; or call
``module.cpu()`` when the copy is wanted. One process is a valid world (``--trainer.devices 1``),
so this is also the strategy of single-GPU DLRM configs.

It is registered with Lightning as ``torchrec_ddp`` (``--trainer.strategy torchrec_ddp``) when
this module is imported, which :mod:`models.dlrm.module` does; ``DLRMModule`` names it as its
``ddp_strategy`` (the CLI runs it for ``--trainer.strategy ddp``) and its
``sharded_checkpoint_strategy`` (the CLI asks for it when ``--ckpt_path`` is a sharded folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lit.checkpoints import META_FILE, is_sharded_checkpoint

NAME = "torchrec_ddp"
StateDictType = Literal["sharded", "full"]


class TorchrecDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves a DMP-wrapped model (e.g. ``models.DLRMModule``) unwrapped.

    Args:
        state_dict_type: ``"sharded"`` (default): a checkpoint is a folder of DCP files, one per
            rank, plus ``meta.pt`` (loops, callbacks, hyperparameters, dense optimizer state);
            tables and fused optimizer state stay sharded on save and are re-sharded on load.
            ``"full"``: one ``.ckpt`` file with every table gathered whole on rank 0 (needs the
            tables to fit in one host's memory; loads with plain ``torch.load``).
        teardown_to_cpu: move the module and optimizer state to the CPU when a run ends, as
            Lightning's strategies do (default False: they stay on the device).
        **kwargs: ``DDPStrategy``'s arguments (``process_group_backend``, ``timeout``, ...).

    Use as ``--trainer.strategy torchrec_ddp`` or, with arguments, from YAML as
    ``trainer.strategy: {class_path: models.dlrm.strategy.TorchrecDDPStrategy, init_args:
    {state_dict_type: full}}``; the model must be built in ``configure_model`` (after the process
    group exists), which ``DLRMModule`` does.
    """

    strategy_name = NAME

    def __init__(self, state_dict_type: StateDictType = "sharded", teardown_to_cpu: bool = False,
                 **kwargs: Any) -> None:
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(f"TorchrecDDPStrategy: state_dict_type={state_dict_type!r}; "
                             "choose 'sharded' (DCP folder) or 'full' (one file)")
        super().__init__(**kwargs)
        self.state_dict_type: StateDictType = state_dict_type
        self.teardown_to_cpu = teardown_to_cpu
        self._sharded_path: Path | None = None  # the DCP folder being restored

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        if NAME not in strategy_registry:
            strategy_registry.register(NAME, cls, description="DDP for torchrec models: tables "
                                       "sharded by torchrec, sharded (DCP) checkpoints")

    @property
    def saves_sharded(self) -> bool:
        """True when checkpoints keep tables sharded (the module must not gather them)."""
        return self.state_dict_type == "sharded"

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        """``DDPStrategy.setup`` without the DDP wrapper and without its state broadcast.

        DMP broadcast the dense parameters when it was built, and the sharded tables differ
        between ranks by design, so Lightning's broadcast of every module state (done outside
        ``fit``) would be wrong as well as slow.
        """
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def configure_ddp(self) -> None:
        # DMP already put DDP around the dense layers; nothing to wrap here.
        pass

    @override
    def teardown(self) -> None:
        """Lightning's teardown (cluster environment, precision plugin, accelerator, checkpoint
        IO) without moving the module and the optimizer state to the CPU, unless
        ``teardown_to_cpu``. There is no DDP wrapper of Lightning's to undo (see ``setup``)."""
        if self.teardown_to_cpu:
            return super().teardown()
        module = self.lightning_module
        if (module is not None and module._trainer is not None and self._layer_sync
                and module._trainer.state.fn == TrainerFn.FITTING):
            self.model = self._layer_sync.revert(self.model)
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # --- checkpoints -----------------------------------------------------------------------------

    @override
    def optimizer_state(self, optimizer) -> dict:
        """The fused optimizer's state as the sharded tensors torchrec keeps (sharded mode)."""
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if self.saves_sharded and hasattr(inner, "fused") and hasattr(inner, "dense_optimizer"):
            return {"fused": inner.fused.state_dict()["state"],
                    "fused_lr": [group["lr"] for group in inner.fused.param_groups],
                    "dense": inner.dense_optimizer.state_dict()}
        return super().optimizer_state(optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        if not self.saves_sharded:
            if self.is_global_zero and is_sharded_checkpoint(path):
                shutil.rmtree(path)
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("TorchrecDDPStrategy(state_dict_type='sharded') writes with "
                            "torch.distributed.checkpoint and takes no storage_options")
        from torch.distributed.checkpoint import save

        if self.is_global_zero:
            if path.is_file():
                path.unlink()
            elif path.is_dir() and not is_sharded_checkpoint(path):
                raise IsADirectoryError(f"checkpoint path {path} is a folder that is not a "
                                        "sharded checkpoint: choose another name")
            path.mkdir(parents=True, exist_ok=True)
        self.barrier("torchrec_ddp_save")
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.get("optimizer_states", [])):
            if isinstance(state, dict) and "fused" in state:
                tensors[f"optimizer_{i}_fused"] = state.pop("fused")
        save(tensors, checkpoint_id=path)
        if self.is_global_zero:
            checkpoint["sharded_checkpoint"] = True
            torch.save(checkpoint, path / META_FILE)
        self.barrier("torchrec_ddp_saved")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            self._sharded_path = None
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint import load

        module = self.lightning_module  # built: the Trainer calls configure_model before restoring
        assert module is not None, "the LightningModule must be attached before loading"
        checkpoint = torch.load(path / META_FILE, map_location="cpu",
                                weights_only=weights_only is not False)
        target = {"state_dict": module.state_dict()}
        load(target, checkpoint_id=path)  # in place, re-sharded to this run's plan
        checkpoint["state_dict"] = target["state_dict"]
        self._sharded_path = path
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if checkpoint.get("sharded_checkpoint"):
            return  # load_checkpoint wrote the tensors into the live model already
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        if not checkpoint.get("sharded_checkpoint"):
            return super().load_optimizer_state_dict(checkpoint)
        from torch.distributed.checkpoint import load

        assert self._sharded_path is not None
        for i, (optimizer, state) in enumerate(zip(self.optimizers,
                                                   checkpoint["optimizer_states"])):
            inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            if not hasattr(inner, "fused"):
                optimizer.load_state_dict(state)
                continue
            target = {f"optimizer_{i}_fused": inner.fused.state_dict()["state"]}
            load(target, checkpoint_id=self._sharded_path)
            for group, lr in zip(inner.fused.param_groups, state.get("fused_lr", [])):
                group["lr"] = lr
            inner.dense_optimizer.load_state_dict(state["dense"])
        _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero and is_sharded_checkpoint(filepath):
            shutil.rmtree(filepath)
            return
        super().remove_checkpoint(filepath)


TorchrecDDPStrategy.register_strategies(StrategyRegistry)
