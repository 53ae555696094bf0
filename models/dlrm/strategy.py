"""A Lightning DDP strategy for torchrec models: processes and process group from Lightning,
model parallelism from torchrec.

Lightning's ``DDPStrategy`` wraps the LightningModule in ``DistributedDataParallel``. A torchrec
model already is distributed: ``DistributedModelParallel`` shards the embedding tables across
ranks (their gradients never leave the fused backward) and wraps only the dense part in DDP
itself. Wrapping it again would all-reduce embedding gradients densely, the problem reported in
torchrec issues #106 and #3114. This strategy keeps everything of ``DDPStrategy`` (launching,
process group, rank-zero logging, checkpoint saving on rank 0, metric reduction) except that
wrapping.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


class TorchrecDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves a DMP-wrapped model (e.g. ``models.DLRMModule``) unwrapped.

    Use from YAML as ``trainer.strategy: {class_path: models.dlrm.strategy.TorchrecDDPStrategy}``
    with ``devices: N``; the model must be built in ``configure_model`` (after the process group
    exists), which ``DLRMModule`` does.
    """

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
