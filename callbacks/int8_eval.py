"""Test a text classifier in its own precision AND in LLM.int8(), side by side, in one run.

Dettmers et al., "LLM.int8()" (arXiv 2208.07339): the int8 layers are :class:`models.int8.Int8Linear`.
Add the callback to a ``test`` (or to ``fit``, whose final test then does the same)::

    python -m lit test --config configs/bert/minilm_dense.yaml --ckpt_path X.ckpt \\
        --trainer.callbacks+=callbacks.Int8Eval

The model's own test pass runs first and logs ``test/acc`` and ``test/loss`` as usual. At the
end of that epoch the callback

1. calibrates: hooks the selected Linear layers on ``calibration_batches`` batches of the
   validation split and keeps the 16-bit weight columns of every input dimension that reached
   the threshold there (the paper's systematic outlier dimensions; see ``models/int8.py``);
2. swaps those layers for ``Int8Linear`` in place (``outliers="dynamic"`` by default: every
   column is checked on every call, as in the paper), runs the same test batches again, logs
   ``test_int8/acc`` and ``test_int8/loss``, and puts the original layers back;
3. logs the weight memory of both: ``test/weight_mb`` and ``test_int8/weight_mb`` (the whole
   model's parameters and buffers, as held: fp32 under ``32-true``, bf16 under ``bf16-true``) and
   ``test/linear_mb`` / ``test_int8/linear_mb`` (the converted layers alone).

The comparison is "as run": under ``--trainer.precision bf16-true`` the reference is bf16 and the
int8 model's outlier part and unconverted layers are bf16 too (the paper's setting); under
``32-true`` both are fp32. Batches must be dicts with ``input_ids``, optional
``attention_mask`` and ``labels``, and the module's ``forward(input_ids, attention_mask)`` must
return logits (:class:`models.BertClassifier`). A checkpoint trained with N:M pruning converts
like a dense one (its zeros quantize to zero).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from models.int8 import (DEFAULT_INCLUDE, OUTLIER_MODES, Int8Linear, OutlierCounter, check_threshold,
                         quantize_model, weight_bytes)

MB = 2**20


class Int8Eval(Callback):
    """Evaluate the test split a second time with LLM.int8() layers (see module docstring).

    Args:
        threshold: outlier threshold ``alpha`` (the paper: 6.0; ``.inf`` = plain int8).
        include: regexes (``re.search``) over module names selecting the layers to convert.
        exclude: regexes removing layers from the selection.
        calibration_batches: validation batches used to choose the kept 16-bit weight columns;
            0 keeps none (outlier columns then use their dequantized int8 weights).
        keep_min_fraction: keep a dimension's 16-bit weight column when it reached the
            threshold at more than this fraction of the calibration positions (0: at least once).
        outliers: ``"dynamic"`` (the paper: every column checked on every call) or
            ``"calibrated"`` (only the kept columns; fixed shapes), see ``models/int8.py``.
        prefix: metric prefix of the int8 pass.
    """

    def __init__(
        self,
        threshold: float = 6.0,
        include: list[str] = [DEFAULT_INCLUDE],  # noqa: B006 (YAML default, never mutated)
        exclude: list[str] = [],  # noqa: B006
        calibration_batches: int = 8,
        keep_min_fraction: float = 0.0,
        outliers: Literal["dynamic", "calibrated"] = "dynamic",
        prefix: str = "test_int8",
    ) -> None:
        self.threshold = check_threshold(threshold)
        if not include:
            raise ValueError("include: need at least one regex selecting layers, e.g. 'encoder\\.layer'")
        if calibration_batches < 0:
            raise ValueError(f"calibration_batches: must be >= 0, got {calibration_batches!r}")
        if not 0.0 <= keep_min_fraction < 1.0:
            raise ValueError(f"keep_min_fraction: must be in [0, 1), got {keep_min_fraction!r}")
        if outliers not in OUTLIER_MODES:
            raise ValueError(f"outliers: expected 'dynamic' or 'calibrated', got {outliers!r}")
        if not prefix or prefix == "test":
            raise ValueError(f"prefix: must be non-empty and differ from 'test', got {prefix!r}")
        self.include, self.exclude = list(include), list(exclude)
        self.calibration_batches = calibration_batches
        self.keep_min_fraction, self.outliers = keep_min_fraction, outliers
        self.prefix = prefix
        self.report = None  # models.int8.Int8Report of the last run
        self.fp16_dims: dict[str, torch.Tensor] = {}  # kept 16-bit columns of the last run
        self.results: dict[str, float] = {}

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before = weight_bytes(pl_module)
        originals = dict(pl_module.named_modules())
        fp16_dims = self.fp16_dims = self._calibrate(trainer, pl_module)
        self.report = quantize_model(pl_module, self.threshold, self.include, self.exclude, fp16_dims,
                                     self.outliers)
        try:
            after = weight_bytes(pl_module)
            loss, acc = self._evaluate(trainer, pl_module)
        finally:
            for name in self.report.converted:  # the 16-bit layers come back whatever happened
                pl_module.set_submodule(name, originals[name])
        kept = sum(len(v) for v in fp16_dims.values())
        self.results = {
            f"{self.prefix}/acc": acc, f"{self.prefix}/loss": loss,
            "test/weight_mb": before / MB, f"{self.prefix}/weight_mb": after / MB,
            "test/linear_mb": self.report.bytes_before / MB, f"{self.prefix}/linear_mb": self.report.bytes_after / MB,
        }
        for key, value in self.results.items():
            pl_module.log(key, value, sync_dist=False)
        rank_zero_info(f"[int8] {self.report}\n[int8] kept 16-bit weight columns: {kept} over "
                       f"{len(fp16_dims)} layers (calibration: {self.calibration_batches} validation batches)\n"
                       f"[int8] weights {before / MB:.2f} MiB -> {after / MB:.2f} MiB; "
                       f"test acc int8 {acc:.4f}, loss {loss:.4f}")

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """Per selected layer, the input dims that reached the threshold on validation batches."""
        if self.calibration_batches == 0 or self.threshold == float("inf"):
            return {}
        from models.nm_sparsity import select_linears

        layers = select_linears(pl_module, self.include, self.exclude)
        layers = {n: m for n, m in layers.items() if not isinstance(m, Int8Linear)}
        if not layers:
            return {}
        loader = self._val_loader(trainer)
        counter = OutlierCounter(layers, self.threshold)
        with counter, torch.no_grad(), trainer.precision_plugin.forward_context():
            for i, batch in enumerate(loader):
                if i >= self.calibration_batches:
                    break
                batch = self._check(trainer.strategy.batch_to_device(batch))
                counter.set_mask(batch.get("attention_mask"))
                pl_module(batch["input_ids"], batch.get("attention_mask"))
        return counter.outlier_dims(self.keep_min_fraction)

    @staticmethod
    def _val_loader(trainer: Trainer):
        dm = trainer.datamodule
        if dm is None:
            raise ValueError("calibration_batches: > 0 needs a datamodule with a validation split; "
                             "set calibration_batches: 0 to skip calibration")
        try:
            return dm.val_dataloader()
        except Exception:  # a datamodule set up for "test" only: set up its validation split
            dm.setup("validate")
            return dm.val_dataloader()

    @staticmethod
    def _check(batch: object) -> dict:
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"Int8Eval: batches must be dicts with 'input_ids' and 'labels' (a text "
                             f"classification datamodule), got {keys!r}")
        return batch

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> tuple[float, float]:
        """Mean cross-entropy and accuracy over every test dataloader, reduced across ranks."""
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        device = pl_module.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        limit = trainer.num_test_batches
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for k, loader in enumerate(loaders):
                for i, batch in enumerate(loader):
                    if i >= limit[k]:
                        break
                    batch = self._check(trainer.strategy.batch_to_device(batch))
                    logits = pl_module(batch["input_ids"], batch.get("attention_mask")).float()
                    labels = batch["labels"]
                    loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
                    correct += (logits.argmax(dim=-1) == labels).sum().double()
                    count += labels.numel()
        loss_sum, correct, count = (trainer.strategy.reduce(t, reduce_op="sum") for t in (loss_sum, correct, count))
        if float(count) == 0:
            raise ValueError("Int8Eval: the test dataloader yielded no batches")
        return float(loss_sum / count), float(correct / count)
