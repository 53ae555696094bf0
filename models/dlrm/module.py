"""DLRM on torchrec with the four parameter-scaling knobs of Ardalani et al., "Understanding
Scaling Laws for Recommendation Models" (arXiv 2208.08489): V (rows per table), H (embedding
dim), M (top-MLP widths) and O (width multiplier on every non-embedding layer).

The network is torchrec's ``DLRM`` (or ``DLRM_DCN``) built by
:func:`models.dlrm.network.build_dlrm`; the module
wraps it in ``DistributedModelParallel`` with the embedding optimizer fused into the backward
pass (see :mod:`models.dlrm.sharded`) and drives it with Lightning's manual optimization, so
Lightning never wraps the model a second time. Notation: B batch, F sparse features, H (= D in
torchrec) embedding dim.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Iterable
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from torch.nn.modules.module import _IncompatibleKeys
from typing_extensions import override

from datamodules.ctr.batch import CTRSchema, PackedBatch, make_batch
from lit.module import LitModule, eval_mode
from models.dlrm.metrics import CTRMetrics
from models.dlrm.network import build_dlrm, fold_ids
from models.dlrm.sharded import (EmbeddingOptimizerName, ShardingTypeName, copy_plain_into,
                                 dense_named_parameters, is_sharded, make_fused_dense_optimizer,
                                 shard_with_fused_optimizer, to_plain)
from models.dlrm.sizing import DLRMShape, dlrm_shape
from models.dlrm.strategy import TorchrecDDPStrategy  # importing it registers torchrec_ddp


def default_dense_optimizer(params) -> torch.optim.Optimizer:
    """Adagrad(lr=0.01) for the dense layers: the DLRM reference recipe's optimizer."""
    return torch.optim.Adagrad(params, lr=0.01)


class StepPath(enum.Enum):
    """How :meth:`DLRMModule.training_step` runs backward and the optimizer step; chosen by
    :func:`step_path` at every train start (the only transition).

    * ``LIGHTNING``: ``manual_backward`` and ``LightningOptimizer.step``: the precision plugin
      (loss scaling), the strategy's backward hooks, and every callback's and the module's
      ``on_before_backward`` / ``on_after_backward`` / ``on_before_optimizer_step``.
    * ``DIRECT``: ``loss.backward()`` and the optimizer's own ``step``, counted as Lightning
      counts it (``trainer.global_step``). Only when that path would add nothing: no loss
      scaling, a strategy with nothing around backward, and nobody listening to those hooks.
      On a GPU the step is bound by host work, and Lightning's path costs a round of calls
      through every callback for each of the three hooks.
    """

    LIGHTNING = "lightning"
    DIRECT = "direct"


#: The hooks the direct path does not call.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def step_path(trainer, module: LightningModule) -> tuple[StepPath, str]:
    """The :class:`StepPath` for ``module`` under ``trainer``, and why."""
    precision = trainer.precision_plugin
    if getattr(precision, "scaler", None) is not None:
        return StepPath.LIGHTNING, f"precision plugin {type(precision).__name__} (loss scaling)"
    if type(precision) not in (Precision, MixedPrecision):
        return StepPath.LIGHTNING, f"precision plugin {type(precision).__name__}"
    if type(trainer.strategy) not in (SingleDeviceStrategy, TorchrecDDPStrategy):
        return StepPath.LIGHTNING, f"strategy {type(trainer.strategy).__name__}"
    for callback in trainer.callbacks:
        for hook in STEP_HOOKS:
            if is_overridden(hook, callback, Callback):
                return StepPath.LIGHTNING, f"{type(callback).__name__}.{hook}"
    for hook in (*STEP_HOOKS, "backward"):
        if is_overridden(hook, module, LightningModule):
            return StepPath.LIGHTNING, f"{type(module).__name__}.{hook}"
    if not all(hasattr(o, "_on_before_step") and hasattr(o, "_on_after_step")
               for o in trainer.strategy._lightning_optimizers):
        return StepPath.LIGHTNING, "this Lightning's optimizer wrapper counts steps differently"
    return StepPath.DIRECT, "no loss scaling and no backward or optimizer-step hooks"


class DLRMModule(LitModule):
    """DLRM click-through-rate model with fused sparse embedding updates.

    The feature schema (dense count, sparse names, cardinalities) comes from the datamodule's
    ``schema`` unless given here. Each table has ``min(V, cardinality)`` rows; ids beyond V are
    folded in by modulo.

    Args:
        embedding_dim: H, the dimension of every table (and the bottom MLP's output).
        num_embeddings: V, rows per table: one int for all, or one per sparse feature.
        dense_arch_layer_sizes: hidden widths of the bottom MLP (H is appended).
        over_arch_layer_sizes: M, hidden widths of the top MLP (the logit layer is appended).
        width_multiplier: O, multiplies every hidden width above and the DCN rank.
        interaction: ``"dot"`` (DLRM's pairwise dots) or ``"dcn"`` (low-rank cross net).
        dcn_num_layers, dcn_low_rank_dim: the cross net's depth and rank (``"dcn"`` only).
        embedding_optimizer: fused in-backward optimizer of the tables (fbgemm TBE).
        embedding_lr, embedding_eps, embedding_weight_decay: its settings.
        sharding_types: sharding types the torchrec planner may choose (default table-, row-
            or column-wise).
        num_dense_features, sparse_feature_names, sparse_cardinalities: the schema, when not
            taken from the datamodule (names differ from the datamodules' own so that
            Lightning can merge both into one set of logged hyperparameters).
        auroc_thresholds: ``None`` = exact AUROC; an int bins predictions (constant memory).
        optimizer: the dense layers' optimizer (any torch optimizer, or ``lit.optim.Adan``).
        lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`; the scheduler
            sees every param group, so it scales the embedding lr too.
    """

    #: The strategy the CLI substitutes for ``--trainer.strategy ddp``: DMP must not be wrapped
    #: in a second DDP (see :mod:`models.dlrm.strategy`).
    ddp_strategy = TorchrecDDPStrategy.strategy_name
    #: It writes the sharded checkpoints (DCP folders) and is the one that reads them.
    sharded_checkpoint_strategy = TorchrecDDPStrategy.strategy_name

    def __init__(
        self,
        embedding_dim: int = 64,
        num_embeddings: int | list[int] = 100_000,
        dense_arch_layer_sizes: list[int] = [512, 256],  # noqa: B006  (YAML-visible default)
        over_arch_layer_sizes: list[int] = [512, 512, 256],  # noqa: B006
        width_multiplier: float = 1.0,
        interaction: Literal["dot", "dcn"] = "dot",
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 512,
        embedding_optimizer: EmbeddingOptimizerName = "row_wise_adagrad",
        embedding_lr: float = 0.01,
        embedding_eps: float = 1e-8,
        embedding_weight_decay: float = 0.0,
        sharding_types: list[ShardingTypeName] | None = None,
        num_dense_features: int | None = None,
        sparse_feature_names: list[str] | None = None,
        sparse_cardinalities: list[int] | None = None,
        auroc_thresholds: int | None = None,
        optimizer: OptimizerCallable = default_dense_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval, monitor="val/logloss")
        if embedding_optimizer not in get_args(EmbeddingOptimizerName):
            raise ValueError(f"embedding_optimizer must be one of "
                             f"{get_args(EmbeddingOptimizerName)}, got {embedding_optimizer!r}")
        if embedding_lr <= 0:
            raise ValueError(f"embedding_lr must be > 0, got {embedding_lr!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.automatic_optimization = False  # the tables update inside backward
        given = [num_dense_features is not None, sparse_feature_names is not None,
                 sparse_cardinalities is not None]
        if any(given) and not all(given):
            raise ValueError("num_dense_features, sparse_feature_names, sparse_cardinalities: give "
                             "all three or none (then the datamodule's schema is used)")
        self.schema: CTRSchema | None = None
        if all(given):
            if len(sparse_feature_names) != len(sparse_cardinalities):
                raise ValueError(f"sparse_cardinalities: {len(sparse_cardinalities)} values for "
                                 f"{len(sparse_feature_names)} sparse_feature_names")
            self.schema = CTRSchema(num_dense_features, tuple(sparse_feature_names),
                                    tuple(sparse_cardinalities))
            self.shape = self._shape(self.schema)  # validate the knobs now
        self.model: nn.Module | None = None
        self.val_metrics = self.ctr_metrics()
        self.test_metrics = self.ctr_metrics()
        self.samples_seen = 0
        # Progressive train loss of the current epoch: (sum of loss x samples, samples), float64.
        # Saved in checkpoints, so a mid-epoch resume reports the whole epoch's mean.
        self._progressive = torch.zeros(2, dtype=torch.float64)
        self.size_report: dict[str, int] = {}
        #: Seconds of the last build: ``plan_s`` (torchrec's planner), ``shard_s`` (DMP).
        self.build_seconds: dict[str, float] = {}
        self.step_path, self.step_path_reason = StepPath.LIGHTNING, "not trained yet"
        self._world_size = 1
        self._step_clock: float | None = None
        self._clock_samples = 0

    # --- network -------------------------------------------------------------------------------

    def _shape(self, schema: CTRSchema) -> DLRMShape:
        hp = self.hparams
        return dlrm_shape(schema.cardinalities, schema.num_dense, hp.num_embeddings,
                          hp.embedding_dim, hp.dense_arch_layer_sizes, hp.over_arch_layer_sizes,
                          hp.width_multiplier, hp.interaction, hp.dcn_num_layers,
                          hp.dcn_low_rank_dim)

    def _resolve_schema(self) -> CTRSchema:
        if self.schema is not None:
            return self.schema
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        schema = getattr(datamodule, "schema", None)
        if schema is None:
            raise ValueError("DLRMModule: no feature schema; use a CTR datamodule (CriteoTSV, "
                             "SyntheticCTR, MovieLens100K) or give num_dense_features, "
                             "sparse_feature_names and sparse_cardinalities")
        self.schema = schema
        return schema

    @override
    def configure_model(self) -> None:
        """Build the DLRM and wrap it in DMP on this process's device (once)."""
        if self.model is not None:
            return
        self.build(self._trainer.strategy.root_device if self._trainer else torch.device("cpu"))

    def build(self, device: torch.device | str) -> None:
        """Build the DLRM and wrap it in DMP on ``device`` (what ``configure_model`` does with
        the Trainer's device; call it directly to use the module without a Trainer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        schema = self._resolve_schema()
        self.shape = self._shape(schema)
        hp = self.hparams
        self.build_seconds = {}
        self.model = shard_with_fused_optimizer(
            build_dlrm(self.shape, schema.sparse_names), device, hp.embedding_optimizer,
            hp.embedding_lr, hp.embedding_eps, hp.embedding_weight_decay, hp.sharding_types,
            timings=self.build_seconds)
        rows = torch.tensor(self.shape.rows, dtype=torch.int64)
        # Fold ids only when some table is smaller than its feature's cardinality.
        needs_fold = any(r < c for r, c in zip(self.shape.rows, schema.cardinalities))
        self.register_buffer("table_rows", rows.to(device) if needs_fold else None, persistent=False)
        # One sample of zeros: lets Lightning's model summary count the forward FLOPs.
        num_sparse = len(schema.sparse_names)
        self.example_input_array = make_batch(
            np.zeros((1, schema.num_dense), np.float32), np.zeros((1, num_sparse), np.int64),
            np.zeros(1), np.zeros(1, np.int64), schema.sparse_names)
        self.size_report = {
            "embedding_parameters": self.shape.embedding_parameters(),
            "dense_parameters": self.shape.dense_parameters(),
            "forward_flops_per_sample": self.shape.forward_flops(),
        }

    @override
    def forward(self, batch) -> torch.Tensor:  # -> (B,) logits
        if self.model is None:
            self.configure_model()
        sparse = batch.sparse_features
        if self.table_rows is not None:
            sparse = fold_ids(sparse, self.table_rows)
        return self.model(batch.dense_features, sparse).squeeze(-1)

    # --- optimization ----------------------------------------------------------------------------

    @override
    def optimizer_groups(self) -> list[dict]:
        """The dense parameters, no weight decay on biases (the tables update in backward)."""
        decay, no_decay = [], []
        for param in dense_named_parameters(self.model).values():
            (decay if param.ndim > 1 else no_decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    @override
    def build_optimizer(self):
        """The dense optimizer combined with the tables' fused one (torchrec's CombinedOptimizer);
        the scheduler wiring is the base class's."""
        return make_fused_dense_optimizer(self.model, self.optimizer(self.optimizer_groups()))

    @override
    def extra_hparams(self) -> dict[str, int]:
        """Embedding and dense parameter counts and forward FLOPs per sample (the paper's axes)."""
        return dict(self.size_report)

    @override
    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Batches with their own ``to`` (the CTR batches) copy without blocking the host: the
        loaders pin their memory on a GPU machine, so the copy overlaps the previous step. A
        :class:`~datamodules.ctr.batch.PackedBatch` (file readers) is one copy, unpacked on
        ``device``."""
        if isinstance(batch, PackedBatch):
            return batch.to(device, non_blocking=device.type == "cuda")
        if hasattr(batch, "sparse_features") and hasattr(batch, "to"):
            if batch.dense_features.device == device:  # generated on the device: nothing to do
                return batch
            return batch.to(device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self.step_path, self.step_path_reason = step_path(self.trainer, self)
        self._world_size = self.trainer.world_size

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        logits = self(batch)
        # Progressive loss: computed on this batch before any update from it.
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        if self.step_path is StepPath.DIRECT:
            inner = optimizer.optimizer
            inner.zero_grad()
            loss.backward()
            # What LightningOptimizer.step does around the step, without the precision plugin's
            # closure (which would only call the on_before_optimizer_step hooks).
            optimizer._on_before_step()
            inner.step()
            optimizer._on_after_step()
        else:
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.step_schedulers("step")
        size = batch.labels.shape[0]  # from the shape: no host sync
        self.samples_seen += size * self._world_size
        detached = loss.detach()
        # Accumulated on the device: no host sync and no host-to-device copy per step.
        if self._loss_sum.device != detached.device:
            self._loss_sum = self._loss_sum.to(detached.device)
        self._loss_sum.add_(detached, alpha=size)  # one kernel (float64 += float32 x size)
        self._loss_count += size
        if self._should_log():
            # Throughput since the previous logged step (data loading included), and the loss:
            # logged only on the steps the logger writes, so the other steps pay nothing.
            now = time.perf_counter()
            if self._step_clock is not None:
                rate = (self.samples_seen - self._clock_samples) / max(now - self._step_clock, 1e-9)
                self.log("train/samples_per_s", rate, on_step=True, on_epoch=False)
            self._step_clock, self._clock_samples = now, self.samples_seen
            self.log("train/loss", detached, on_step=True, on_epoch=False, batch_size=size)
        return detached

    def _should_log(self) -> bool:
        """Whether the logger writes this step's values (Lightning's ``log_every_n_steps``)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    @property
    def _progressive(self) -> torch.Tensor:
        """(sum of loss x samples, samples) of the epoch so far, float64 on the host (one sync)."""
        return torch.stack([self._loss_sum.detach().cpu(),
                            torch.tensor(float(self._loss_count), dtype=torch.float64)])

    @_progressive.setter
    def _progressive(self, value: torch.Tensor) -> None:
        total, count = value.double().cpu().tolist()
        device = self._loss_sum.device if hasattr(self, "_loss_sum") else torch.device("cpu")
        self._loss_sum = torch.tensor(total, dtype=torch.float64, device=device)
        self._loss_count = int(count)

    @override
    def on_train_epoch_end(self) -> None:
        # Mean progressive loss over every sample of the epoch (each scored before its update),
        # logged as a tensor on the module's device (NCCL reduces only device tensors).
        mean = self._loss_sum / max(self._loss_count, 1)
        self.log("train/progressive_loss", mean.float().to(self.device), sync_dist=True)
        self._progressive = torch.zeros(2, dtype=torch.float64)
        self.step_schedulers("epoch")

    # --- evaluation ------------------------------------------------------------------------------

    def ctr_metrics(self) -> CTRMetrics:
        """New held-out metrics like the module's own (same ``auroc_thresholds``)."""
        return CTRMetrics(self.hparams.auroc_thresholds)

    def score_batch(self, batch, metrics: CTRMetrics) -> None:
        """Add a held-out batch to ``metrics``: the step of validation, test and of
        :class:`callbacks.EvalAtSamples` (one code path for every held-out number)."""
        metrics.update(self(batch), batch.labels)

    def held_out_metrics(self, batches: Iterable,
                         context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                         ) -> dict[str, float]:
        """CTR metrics over ``batches`` in eval mode, between training steps (what
        :class:`callbacks.EvalAtSamples` asks at its sample counts): each batch moved by
        :meth:`transfer_batch_to_device` (non-blocking from pinned memory, nothing to do for
        on-device batches) and scored by :meth:`score_batch` inside ``context()`` (the
        Trainer's precision context); the metrics are reduced across ranks once, at the end."""
        metrics = self.ctr_metrics().to(self.device)
        with eval_mode(self), context():
            for batch in batches:
                self.score_batch(self.transfer_batch_to_device(batch, self.device, 0), metrics)
        return {k: float(v) for k, v in metrics.compute().items()}

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        self.score_batch(batch, self.val_metrics)

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        self.score_batch(batch, self.test_metrics)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        self._step_clock = None  # the next step's interval would include validation

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: CTRMetrics) -> None:
        values = metrics.compute()  # already reduced across ranks by torchmetrics
        metrics.reset()
        for name, value in values.items():  # sync_dist: identical on every rank already
            self.log(f"{stage}/{name}", value.to(self.device), prog_bar=name in ("logloss", "auroc"),
                     sync_dist=True)
        self.log(f"{stage}/samples_seen",
                 torch.tensor(float(self.samples_seen), device=self.device), sync_dist=True)

    @override
    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch))

    # --- checkpoints -----------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the tables as plain tensors (loadable with ``weights_only=True``) and the schema."""
        super().on_save_checkpoint(checkpoint)
        if not getattr(getattr(self._trainer, "strategy", None), "saves_sharded", False):  # DCP: shards
            checkpoint["state_dict"] = to_plain(checkpoint["state_dict"])
        checkpoint["samples_seen"] = self.samples_seen
        checkpoint["progressive_loss"] = self._progressive.cpu()
        if self.schema is not None:
            checkpoint["ctr_schema"] = {"num_dense": self.schema.num_dense,
                                        "sparse_names": list(self.schema.sparse_names),
                                        "cardinalities": list(self.schema.cardinalities)}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Build the model (from the saved schema if needed) before its state is loaded."""
        if self.schema is None and "ctr_schema" in checkpoint:
            saved = checkpoint["ctr_schema"]
            self.schema = CTRSchema(saved["num_dense"], tuple(saved["sparse_names"]),
                                    tuple(saved["cardinalities"]))
        self.configure_model()
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
        if "progressive_loss" in checkpoint:
            self._progressive = checkpoint["progressive_loss"].double()

    @override
    def state_dict(self, *args, **kwargs) -> dict:
        """DMP's own state dict under ``model.`` (nesting DMP in a parent module garbles its keys)."""
        if self.model is None:
            return {}
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy plain (or sharded) tensors into the DMP model's parameters, in place."""
        if self.model is None:
            self.configure_model()
        current = self.model.state_dict()
        given = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        missing = sorted(set(current) - set(given))
        unexpected = sorted(set(given) - set(current)) + [k for k in state_dict
                                                         if not k.startswith("model.")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"DLRMModule.load_state_dict: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        with torch.no_grad():
            for key in set(current) & set(given):
                value = given[key]
                copy_plain_into(current[key], value if isinstance(value, torch.Tensor)
                                and not is_sharded(value) else to_plain(value))
        return _IncompatibleKeys(missing, unexpected)

