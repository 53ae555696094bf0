"""Test a text classifier in its own precision AND in LLM.int8(), side by side, in one test loop.

Dettmers et al., "LLM.int8()" (arXiv 2208.07339): the int8 layers are :class:`models.int8.Int8Linear`.
Add the callback to a ``test`` (or to ``fit``, whose final test then does the same)::

    python -m lit test --config configs/bert/minilm_dense.yaml --ckpt_path X.ckpt \\
        --trainer.callbacks+=callbacks.Int8Eval

When the test loop starts, the callback

1. calibrates: hooks the selected Linear layers on ``calibration_batches`` batches of the
   validation split (a forward-only pass, no metric) and keeps the 16-bit weight columns of
   every input dimension that reached the threshold there (the paper's systematic outlier
   dimensions; see ``models/int8.py``);
2. builds an int8 copy of the network: :func:`models.classifier.shared_copy` of ``net`` (new
   modules, the same tensors), whose selected layers :func:`models.int8.quantize_model`
   replaces by ``Int8Linear`` (``outliers="dynamic"`` by default: every column is checked on
   every call, as in the paper); the module's own layers are never touched;
3. registers it as the module's evaluation variant ``prefix``
   (:meth:`models.classifier.ClassifierModule.add_eval_variant`). On a GPU the copy runs from
   CUDA graphs by default (``cuda_graphs``): batches padded into static ``(batch, seq)`` buckets
   by :class:`models.sparse_inference.BucketedRunner`, one graph per bucket, unpadded batches
   with transformers' unmasked flash attention (``hf_forward``). The fused int8 kernels detect
   outlier columns on the device, so a graph stays exact when the outlier set changes between
   batches; eagerly each int8 layer costs a few kernel launches more than a 16-bit one.

The test loop then scores every batch twice, the module's pass and the int8 copy's, with the
same code: ``test/acc``, ``test/loss`` and ``test_int8/acc``, ``test_int8/loss`` come from one
loop over the same batches. At the end of the epoch the callback logs the weight memory of both:
``test/weight_mb`` and ``test_int8/weight_mb`` (the whole model's parameters and buffers, as held:
fp32 under ``32-true``, bf16 under ``bf16-true``) and ``test/linear_mb`` / ``test_int8/linear_mb``
(the converted layers alone); at the end of the loop it removes the variant and drops the copy.

The comparison is "as run": under ``--trainer.precision bf16-true`` the reference is bf16 and the
int8 model's outlier part and unconverted layers are bf16 too (the paper's setting); under
``32-true`` both are fp32. The module must be a :class:`models.BertClassifier` (its
``net_logits`` runs the copy); calibration batches must be dicts with ``input_ids`` and optional
``attention_mask``. A checkpoint trained with N:M pruning converts like a dense one (its zeros
quantize to zero).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from models.classifier import ClassifierModule, shared_copy
from models.sparse_inference import (DEFAULT_BATCH_BUCKETS, DEFAULT_SEQ_BUCKETS, BucketedRunner, check_buckets,
                                     logits_runner)
from models.int8 import (DEFAULT_INCLUDE, OUTLIER_MODES, Int8Report, OutlierCounter, check_threshold,
                         quantize_model, weight_bytes)

MB = 2**20


def calibrate_fp16_dims(module: nn.Module, layers: dict[str, nn.Module], batches: Iterable[dict],
                        threshold: float, keep_min_fraction: float = 0.0) -> dict[str, torch.Tensor]:
    """Calibration, not evaluation: per layer, the input dimensions that reached ``threshold``.

    Runs ``module(input_ids, attention_mask)`` on each batch (forward only, nothing is scored)
    with :class:`models.int8.OutlierCounter` hooked on ``layers`` (padding not counted) and
    returns :meth:`~models.int8.OutlierCounter.outlier_dims` ``(keep_min_fraction)``: the
    16-bit weight columns an :class:`~models.int8.Int8Linear` keeps. Call it without autograd,
    with batches already on the module's device.
    """
    counter = OutlierCounter(layers, threshold)
    with counter:
        for batch in batches:
            counter.set_mask(batch.get("attention_mask"))
            module(batch["input_ids"], batch.get("attention_mask"))
    return counter.outlier_dims(keep_min_fraction)


class Int8Eval(Callback):
    """Score the test split in int8 too, as an evaluation variant (see module docstring).

    Args:
        threshold: outlier threshold ``alpha`` (the paper: 6.0; ``.inf`` = plain int8).
        include: regexes (``re.search``) over module names (as in the LightningModule:
            ``net.bert.encoder...``) selecting the layers to convert.
        exclude: regexes removing layers from the selection.
        calibration_batches: validation batches used to choose the kept 16-bit weight columns;
            0 keeps none (outlier columns then use their dequantized int8 weights).
        keep_min_fraction: keep a dimension's 16-bit weight column when it reached the
            threshold at more than this fraction of the calibration positions (0: at least once).
        outliers: ``"dynamic"`` (the paper: every column checked on every call) or
            ``"calibrated"`` (only the kept columns; fixed shapes), see ``models/int8.py``.
        prefix: metric prefix of the int8 pass.
        cuda_graphs: on a GPU, how the int8 copy runs: ``true`` (CUDA graphs of padded
            buckets), ``"auto"`` (per bucket, the faster of its graph and eager), ``"compile"``
            (``torch.compile`` reduce-overhead per bucket) or ``false`` (eager). Ignored on the CPU.
        seq_buckets, batch_buckets: the static shapes of the graphs (inputs are padded up to them).

    After a test, :attr:`results` holds the logged numbers, :attr:`report` the
    :class:`models.int8.Int8Report` and :attr:`fp16_dims` the kept columns per layer.
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
        cuda_graphs: bool | Literal["auto", "hand", "compile", "eager"] = True,
        seq_buckets: list[int] = list(DEFAULT_SEQ_BUCKETS),  # noqa: B006
        batch_buckets: list[int] = list(DEFAULT_BATCH_BUCKETS),  # noqa: B006
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
        if cuda_graphs not in (True, False, "auto", "hand", "compile", "eager"):
            raise ValueError(f"cuda_graphs: expected true, false, 'auto', 'hand', 'compile' or 'eager', "
                             f"got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.seq_buckets = check_buckets(seq_buckets, "seq_buckets")
        self.batch_buckets = check_buckets(batch_buckets, "batch_buckets")
        self.runner: BucketedRunner | None = None  # the int8 copy's graphs while a test runs on a GPU
        self.include, self.exclude = list(include), list(exclude)
        self.calibration_batches = calibration_batches
        self.keep_min_fraction, self.outliers = keep_min_fraction, outliers
        self.prefix = prefix
        self.report: Int8Report | None = None  # of the last run
        self.fp16_dims: dict[str, torch.Tensor] = {}  # kept 16-bit columns of the last run
        self.results: dict[str, float] = {}
        self._net: nn.Module | None = None  # the int8 copy while a test runs
        self._bytes: tuple[int, int] = (0, 0)  # whole model: (own, int8)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, ClassifierModule) or not callable(getattr(pl_module, "net_logits", None)):
            raise ValueError(f"Int8Eval: needs a models.BertClassifier (a ClassifierModule with .net and "
                             f"net_logits), got {type(pl_module).__name__}")
        self.fp16_dims = self._calibrate(trainer, pl_module)
        # The test loop runs in inference mode; the copy's modules are ordinary ones.
        with torch.inference_mode(False), torch.no_grad():
            holder = nn.ModuleDict({"net": shared_copy(pl_module.net).eval()})  # names as in pl_module
            self.report = quantize_model(holder, self.threshold, self.include, self.exclude, self.fp16_dims,
                                         self.outliers)
        self._net = holder["net"]
        own = weight_bytes(pl_module)
        self._bytes = (own, own - weight_bytes(pl_module.net) + weight_bytes(self._net))
        forward = functools.partial(pl_module.net_logits, self._net)
        if pl_module.device.type == "cuda" and self.cuda_graphs is not False:
            self.runner = forward = logits_runner(self._net, self.seq_buckets, self.batch_buckets, self.cuda_graphs)
        pl_module.add_eval_variant(self.prefix, forward)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._net is None:
            return
        for key, value in self._memory().items():
            pl_module.log(key, value, sync_dist=False)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._net is None:
            return
        self._release(pl_module)
        metrics = trainer.callback_metrics
        self.results = {k: float(metrics[k]) for k in (f"{self.prefix}/acc", f"{self.prefix}/loss")
                        if k in metrics}
        self.results.update(self._memory())
        own_mb, int8_mb = (b / MB for b in self._bytes)
        kept = sum(len(v) for v in self.fp16_dims.values())
        rank_zero_info(f"[int8] {self.report}\n[int8] kept 16-bit weight columns: {kept} over "
                       f"{len(self.fp16_dims)} layers (calibration: {self.calibration_batches} validation "
                       f"batches)\n[int8] weights {own_mb:.2f} MiB -> {int8_mb:.2f} MiB; test acc int8 "
                       f"{self.results.get(f'{self.prefix}/acc', float('nan')):.4f}, loss "
                       f"{self.results.get(f'{self.prefix}/loss', float('nan')):.4f}")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._net is not None:
            self._release(pl_module)

    def _release(self, pl_module: LightningModule) -> None:
        if self.prefix in pl_module.eval_variants:
            pl_module.remove_eval_variant(self.prefix)
        self._net = self.runner = None

    def _memory(self) -> dict[str, float]:
        own, int8 = self._bytes
        report, p = self.report, self.prefix
        return {"test/weight_mb": own / MB, f"{p}/weight_mb": int8 / MB,
                "test/linear_mb": report.bytes_before / MB, f"{p}/linear_mb": report.bytes_after / MB}

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """The kept 16-bit columns from ``calibration_batches`` validation batches."""
        if self.calibration_batches == 0 or self.threshold == float("inf"):
            return {}
        from models.nm_sparsity import select_linears

        layers = select_linears(pl_module, self.include, self.exclude)
        if not layers:
            return {}  # quantize_model names the empty selection
        loader = self._val_loader(trainer)

        def batches():
            for i, batch in enumerate(loader):
                if i >= self.calibration_batches:
                    return
                yield self._check(trainer.strategy.batch_to_device(batch))

        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return calibrate_fp16_dims(pl_module, layers, batches(), self.threshold, self.keep_min_fraction)

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
        if not isinstance(batch, dict) or "input_ids" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"Int8Eval: calibration batches must be dicts with 'input_ids' (a text "
                             f"classification datamodule), got {keys!r}")
        return batch
