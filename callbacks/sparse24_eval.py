"""Test a 2:4 sparse text classifier dense AND 2:4 (cuSPARSELt), side by side, both CUDA-graphed.

Add the callback to ``test`` (or ``predict``) of a checkpoint whose encoder Linear layers are 2:4
sparse (trained with :class:`callbacks.NMPruning`), on a GPU in 16-bit::

    python -m lit test --config configs/bert/minilm_2to4_oneshot.yaml \\
        --config configs/bert/sparse24_inference.yaml --ckpt_path X.ckpt

The model's own (eager, dense-kernel) test pass runs first and logs ``test/acc``. At the end of
that epoch the callback runs the test batches through :class:`models.sparse_inference.BucketedRunner`
(static ``(batch, seq)`` buckets, one CUDA graph per bucket)

1. with the dense weights: ``test_dense/acc``, ``test_dense/loss``, ``test_dense/tokens_per_s``;
2. after :func:`models.sparse_inference.prepare_sparse24`: a timing table of every selected layer,
   dense vs 2:4 at ``timing_tokens`` rows, 2:4 kept only where faster (the others fall
   back to dense and are named in the log), then the whole model timed dense vs exported on one
   bucket (:func:`models.sparse_inference.keep_if_faster`: back to dense unless faster):
   ``test_24/acc``, ``test_24/loss``, ``test_24/tokens_per_s``, ``test_24/speedup`` (over
   graphed dense), ``test_24/dense_fallbacks``;

then puts the dense weights back. Each pass runs the batches twice: the first captures the graphs
and gives the metrics, the second is timed (tokens = real, unpadded tokens).

Under ``predict`` the model is exported the same way and every predict batch runs 2:4 from the
graphs (``BertClassifier.inference_runner``); the dense weights come back at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from models.int8 import DEFAULT_INCLUDE
from models.sparse_inference import (DEFAULT_BATCH_BUCKETS, DEFAULT_SEQ_BUCKETS, BucketedRunner,
                                     Sparse24Plan, bucket_for, bucket_ms, cap_buckets, check_buckets, hf_forward,
                                     keep_if_faster, prepare_sparse24, restore_weights, timed_forward)


class Sparse24Eval(Callback):
    """Dense vs 2:4 test metrics and throughput on CUDA graphs; 2:4 predict (see module docstring).

    Args:
        include: regexes (``re.search``) over module names selecting the layers to export.
        exclude: regexes removing layers from the selection.
        seq_buckets, batch_buckets: static shapes of the graphs (inputs are padded up to them).
        timing_tokens: input rows (batch x seq) at which each layer is timed dense vs 2:4.
        min_speedup: a layer keeps 2:4 only when its measured dense/2:4 time ratio beats this.
        fallback: ``False`` exports every selected layer without timing them (and without the
            whole-model check).
        whole_model_check: time the whole model, dense vs exported, on a random batch of about
            ``timing_tokens`` tokens (128-token rows where a bucket allows) and go back to dense
            unless the export is faster than ``min_speedup``.
        alg_search: let cuSPARSELt search its algorithm (and split-k) per GEMM shape for the
            timing table and the exported layers (default on: with its default algorithm 2:4
            lost end to end on one H200, with the search it won 1.03-1.20x).
        cuda_graphs: ``False`` runs the padded buckets eagerly (to see the host overhead);
            ``"auto"`` keeps, per bucket, the faster of its graph and eager (measured on first use).
        prefix: metric prefix of the 2:4 pass.
    """

    def __init__(
        self,
        include: list[str] = [DEFAULT_INCLUDE],  # noqa: B006 (YAML default, never mutated)
        exclude: list[str] = [],  # noqa: B006
        seq_buckets: list[int] = list(DEFAULT_SEQ_BUCKETS),  # noqa: B006
        batch_buckets: list[int] = list(DEFAULT_BATCH_BUCKETS),  # noqa: B006
        timing_tokens: int = 4096,
        min_speedup: float = 1.0,
        fallback: bool = True,
        whole_model_check: bool = True,
        alg_search: bool = True,
        cuda_graphs: bool | str = True,
        prefix: str = "test_24",
    ) -> None:
        if not include:
            raise ValueError("include: need at least one regex selecting layers, e.g. 'encoder\\.layer'")
        if timing_tokens < 1:
            raise ValueError(f"timing_tokens: must be >= 1, got {timing_tokens!r}")
        if not min_speedup > 0:
            raise ValueError(f"min_speedup: must be > 0, got {min_speedup!r}")
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs: expected true, false or 'auto', got {cuda_graphs!r}")
        if not prefix or prefix in ("test", "test_dense"):
            raise ValueError(f"prefix: must be non-empty and differ from 'test'/'test_dense', got {prefix!r}")
        self.include, self.exclude = list(include), list(exclude)
        self.seq_buckets = check_buckets(seq_buckets, "seq_buckets")
        self.batch_buckets = check_buckets(batch_buckets, "batch_buckets")
        self.timing_tokens, self.whole_model_check = timing_tokens, whole_model_check
        self.min_speedup, self.fallback, self.alg_search = min_speedup, fallback, alg_search
        self.cuda_graphs, self.prefix = cuda_graphs, prefix
        self.plan: Sparse24Plan | None = None  # of the last run
        self.results: dict[str, float] = {}

    def _check_module(self, pl_module: LightningModule) -> None:
        if pl_module.device.type != "cuda":
            raise ValueError("Sparse24Eval: 2:4 kernels are GPU-only; run with --trainer.accelerator gpu")
        dtype = next(pl_module.parameters()).dtype
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"Sparse24Eval: weights are {dtype}; 2:4 needs 16-bit weights: run with "
                             f"--trainer.precision bf16-true (or 16-true)")

    def _runner(self, pl_module: LightningModule) -> BucketedRunner:
        net = pl_module.net
        pad = getattr(net.config, "pad_token_id", 0) or 0
        seq_buckets = cap_buckets(self.seq_buckets, net.config.max_position_embeddings)
        return BucketedRunner(hf_forward(net), seq_buckets, self.batch_buckets, pad, self.cuda_graphs)

    def timing_shape(self, max_positions: int | None = None) -> tuple[int, int]:
        """``(batch, seq)`` bucket of the whole-model check: 128-token rows (or the nearest seq
        bucket, capped at ``max_positions``) and rows for about ``timing_tokens`` tokens."""
        seqs = self.seq_buckets if max_positions is None else cap_buckets(self.seq_buckets, max_positions)
        small = [b for b in seqs if b <= 128]
        seq = small[-1] if small else seqs[0]
        rows = min(max(1, self.timing_tokens // seq), self.batch_buckets[-1])
        return bucket_for(rows, self.batch_buckets), seq

    def _prepare(self, pl_module: LightningModule) -> Sparse24Plan:
        check = self.fallback and self.whole_model_check
        config = pl_module.net.config
        batch, seq = self.timing_shape(config.max_position_embeddings)
        vocab, device = config.vocab_size, pl_module.device
        if check:
            dense_ms = bucket_ms(self._runner(pl_module), batch, seq, vocab, device)
        self.plan = plan = prepare_sparse24(pl_module, self.include, self.exclude, tokens=self.timing_tokens,
                                            min_speedup=self.min_speedup, alg_search=self.alg_search,
                                            fallback=self.fallback)
        if check and plan.choice.sparse:
            sparse_ms = bucket_ms(self._runner(pl_module), batch, seq, vocab, device)
            kept = keep_if_faster(pl_module, plan, dense_ms, sparse_ms, self.min_speedup)
            rank_zero_info(f"[2:4] whole model at {batch} x {seq} tokens: dense {dense_ms:.3f} ms, 2:4 "
                           f"{sparse_ms:.3f} ms ({dense_ms / sparse_ms:.2f}x): "
                           + ("2:4 kept" if kept else "not faster, every layer stays dense"))
        rank_zero_info(f"[2:4] {plan.choice}")
        return plan

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)
        dense = self._evaluate(trainer, self._runner(pl_module))
        plan = self._prepare(pl_module)
        try:
            sparse = self._evaluate(trainer, self._runner(pl_module))
        finally:
            restore_weights(pl_module, plan)
        p = self.prefix
        self.results = {
            "test_dense/acc": dense[0], "test_dense/loss": dense[1], "test_dense/tokens_per_s": dense[2],
            f"{p}/acc": sparse[0], f"{p}/loss": sparse[1], f"{p}/tokens_per_s": sparse[2],
            f"{p}/speedup": sparse[2] / dense[2] if dense[2] else float("nan"),
            f"{p}/dense_fallbacks": float(len(plan.choice.dense)),
        }
        for key, value in self.results.items():
            pl_module.log(key, value, sync_dist=False)
        rank_zero_info(
            "[2:4] graphed test pass    | acc    | loss   | tokens/s\n"
            f"[2:4] dense                | {dense[0]:.4f} | {dense[1]:.4f} | {dense[2]:,.0f}\n"
            f"[2:4] 2:4 (with fallbacks) | {sparse[0]:.4f} | {sparse[1]:.4f} | {sparse[2]:,.0f} "
            f"({self.results[f'{p}/speedup']:.2f}x)")

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)
        self._prepare(pl_module)
        pl_module.inference_runner = self._runner(pl_module)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.inference_runner = None
        if self.plan is not None:
            restore_weights(pl_module, self.plan)

    @staticmethod
    def _batches(trainer: Trainer):
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        for k, loader in enumerate(loaders):
            for i, batch in enumerate(loader):
                if i >= trainer.num_test_batches[k]:
                    break
                if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
                    raise ValueError("Sparse24Eval: batches must be dicts with 'input_ids' and 'labels' "
                                     "(a text classification datamodule)")
                yield trainer.strategy.batch_to_device(batch)

    def _evaluate(self, trainer: Trainer, runner: BucketedRunner) -> tuple[float, float, float]:
        """``(accuracy, mean cross-entropy, real tokens per second)`` over the test batches."""
        loss_sum = correct = count = tokens = 0.0
        for batch in self._batches(trainer):  # first pass: captures the graphs, gives the metrics
            logits = runner(batch["input_ids"], batch.get("attention_mask")).float()
            labels = batch["labels"]
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(dim=-1) == labels).sum())
            count += labels.numel()
        if count == 0:
            raise ValueError("Sparse24Eval: the test dataloader yielded no batches")
        seconds = 0.0
        for batch in self._batches(trainer):  # second pass: timed replays
            mask = batch.get("attention_mask")
            tokens += float(batch["input_ids"].numel() if mask is None else mask.sum())
            seconds += timed_forward(runner, batch["input_ids"], mask)[1]
        return correct / count, loss_sum / count, tokens / seconds if seconds else float("nan")
