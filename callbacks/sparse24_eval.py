"""Test a 2:4 sparse text classifier dense AND 2:4 (cuSPARSELt), side by side, both CUDA-graphed.

Add the callback to ``test`` (or ``predict``) of a checkpoint whose encoder Linear layers are 2:4
sparse (trained with :class:`callbacks.NMPruning`), on a GPU in 16-bit::

    python -m lit test --config configs/bert/minilm_2to4_oneshot.yaml \\
        --config configs/bert/sparse24_inference.yaml --ckpt_path X.ckpt

When the test loop starts, the callback registers two evaluation variants of the module
(:meth:`models.classifier.ClassifierModule.add_eval_variant`), each a
:class:`models.sparse_inference.BucketedRunner` (static ``(batch, seq)`` buckets, one CUDA graph
per bucket):

1. ``test_dense``: the module's network, dense weights (a :func:`models.classifier.shared_copy`);
2. ``test_24`` (``prefix``): a copy of the network (:func:`models.classifier.shared_copy`: new
   modules, the same tensors) exported by :func:`models.sparse_inference.prepare_sparse24`: a
   timing table of every selected layer, dense vs 2:4 at ``timing_tokens`` rows, 2:4 kept only
   where faster (the others stay dense and are named in the log), then the whole model timed
   dense vs exported on one bucket (:func:`models.sparse_inference.keep_if_faster`: back to
   dense unless faster).

The test loop then scores every batch three times with the same code, the module's own (eager,
dense-kernel) pass and both variants: ``test/*``, ``test_dense/*`` and ``test_24/*`` (acc, loss)
come from one loop over the same batches. Throughput: each variant's calls are timed with the
device synchronised around them, and only the calls that replayed graphs made by earlier calls
count (:class:`ReplayTimer`: a call that captured or compiled a graph is never timed; tokens =
real, unpadded tokens). At the end of the epoch ``test_dense/tokens_per_s``, ``test_24/tokens_per_s``,
``test_24/speedup`` (over graphed dense) and ``test_24/dense_fallbacks`` are logged; at the end
of the loop the variants are removed and the copy dropped. The module's weights never change.

Under ``predict`` the module's forward runs the exported copy from the graphs
(``BertClassifier.inference_runner``) for every batch; the runner is removed at the end.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from models.bucketed_runner import BACKENDS
from models.classifier import ClassifierModule, shared_copy
from models.int8 import DEFAULT_INCLUDE
from models.sparse_inference import (DEFAULT_BATCH_BUCKETS, DEFAULT_SEQ_BUCKETS, BucketedRunner,
                                     Sparse24Plan, bucket_for, bucket_ms, cap_buckets, check_buckets, keep_if_faster,
                                     logits_runner, prepare_sparse24, timed_forward)

DENSE = "test_dense"


class ReplayTimer:
    """A :class:`BucketedRunner` as an evaluation variant's forward, timing its replays.

    Every call returns the runner's output. Each call is timed with the device synchronised
    before and after (:func:`models.sparse_inference.timed_forward`), and counted in
    :attr:`seconds` / :attr:`tokens` only when nothing was set up in it: on graphs, when every
    bucket replayed a graph made by an earlier call (``runner.last_call_replayed``: no capture,
    compile or warm-up); eagerly (the CPU, ``cuda_graphs: false``), when its input shape was
    seen before. Under ``cuda_graphs: auto`` the buckets that chose eager are not timed.
    """

    def __init__(self, runner: BucketedRunner) -> None:
        self.runner = runner
        self.seconds, self.tokens, self.timed_calls = 0.0, 0, 0
        self._shapes: set[tuple[int, ...]] = set()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = tuple(input_ids.shape)
        out, seconds = timed_forward(self.runner, input_ids, attention_mask)
        graphed = input_ids.is_cuda and self.runner.backend != "eager"
        if self.runner.last_call_replayed if graphed else shape in self._shapes:
            self.seconds += seconds
            self.tokens += int(input_ids.numel() if attention_mask is None else attention_mask.sum())
            self.timed_calls += 1
        self._shapes.add(shape)
        return out

    @property
    def tokens_per_s(self) -> float:
        """Real tokens per second over the timed calls (``nan`` when none was timed)."""
        return self.tokens / self.seconds if self.seconds else float("nan")


class Sparse24Eval(Callback):
    """Dense vs 2:4 test metrics and throughput on CUDA graphs; 2:4 predict (see module docstring).

    Args:
        include: regexes (``re.search``) over module names (as in the LightningModule:
            ``net.bert.encoder...``) selecting the layers to export.
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
        cuda_graphs: the runner's backend (:class:`models.sparse_inference.BucketedRunner`):
            ``True`` (the default graphs), ``"hand"``, ``"compile"``; ``False`` or ``"eager"``
            runs the padded buckets eagerly (to see the host overhead); ``"auto"`` keeps, per
            bucket, the faster of its graph and eager (measured on first use).
        prefix: metric prefix of the 2:4 pass.

    After a test, :attr:`results` holds the logged numbers and :attr:`plan` the export's
    :class:`models.sparse_inference.Sparse24Plan`.
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
        cuda_graphs: bool | Literal["hand", "compile", "eager", "auto"] = True,
        prefix: str = "test_24",
    ) -> None:
        if not include:
            raise ValueError("include: need at least one regex selecting layers, e.g. 'encoder\\.layer'")
        if timing_tokens < 1:
            raise ValueError(f"timing_tokens: must be >= 1, got {timing_tokens!r}")
        if not min_speedup > 0:
            raise ValueError(f"min_speedup: must be > 0, got {min_speedup!r}")
        if cuda_graphs not in (True, False) + BACKENDS:
            raise ValueError(f"cuda_graphs: expected true, false or one of {BACKENDS}, got {cuda_graphs!r}")
        if not prefix or prefix in ("test", DENSE):
            raise ValueError(f"prefix: must be non-empty and differ from 'test'/'{DENSE}', got {prefix!r}")
        self.include, self.exclude = list(include), list(exclude)
        self.seq_buckets = check_buckets(seq_buckets, "seq_buckets")
        self.batch_buckets = check_buckets(batch_buckets, "batch_buckets")
        self.timing_tokens, self.whole_model_check = timing_tokens, whole_model_check
        self.min_speedup, self.fallback, self.alg_search = min_speedup, fallback, alg_search
        self.cuda_graphs, self.prefix = cuda_graphs, prefix
        self.plan: Sparse24Plan | None = None  # of the last run
        self.results: dict[str, float] = {}
        self._timers: dict[str, ReplayTimer] = {}  # variant prefix -> its forward, while a test runs

    def _check_module(self, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, ClassifierModule) or not hasattr(pl_module, "inference_runner"):
            raise ValueError(f"Sparse24Eval: needs a models.BertClassifier, got {type(pl_module).__name__}")
        if pl_module.device.type != "cuda":
            raise ValueError("Sparse24Eval: 2:4 kernels are GPU-only; run with --trainer.accelerator gpu")
        dtype = next(pl_module.parameters()).dtype
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"Sparse24Eval: weights are {dtype}; 2:4 needs 16-bit weights: run with "
                             f"--trainer.precision bf16-true (or 16-true)")

    def _runner(self, net: nn.Module) -> BucketedRunner:
        return logits_runner(net, self.seq_buckets, self.batch_buckets, self.cuda_graphs)

    def timing_shape(self, max_positions: int | None = None) -> tuple[int, int]:
        """``(batch, seq)`` bucket of the whole-model check: 128-token rows (or the nearest seq
        bucket, capped at ``max_positions``) and rows for about ``timing_tokens`` tokens."""
        seqs = self.seq_buckets if max_positions is None else cap_buckets(self.seq_buckets, max_positions)
        small = [b for b in seqs if b <= 128]
        seq = small[-1] if small else seqs[0]
        rows = min(max(1, self.timing_tokens // seq), self.batch_buckets[-1])
        return bucket_for(rows, self.batch_buckets), seq

    def _sparse_copy(self, pl_module: LightningModule) -> nn.Module:
        """A copy of ``pl_module.net`` with the selected layers exported to 2:4 where faster."""
        check = self.fallback and self.whole_model_check
        config = pl_module.net.config
        batch, seq = self.timing_shape(config.max_position_embeddings)
        vocab, device = config.vocab_size, pl_module.device
        if check:
            dense_ms = bucket_ms(self._runner(pl_module.net), batch, seq, vocab, device)
        # The test loop runs in inference mode; the copy's modules are ordinary ones.
        with torch.inference_mode(False), torch.no_grad():
            holder = nn.ModuleDict({"net": shared_copy(pl_module.net).eval()})  # names as in pl_module
            self.plan = plan = prepare_sparse24(holder, self.include, self.exclude, tokens=self.timing_tokens,
                                                min_speedup=self.min_speedup, alg_search=self.alg_search,
                                                fallback=self.fallback)
        if check and plan.choice.sparse:
            sparse_ms = bucket_ms(self._runner(holder["net"]), batch, seq, vocab, device)
            kept = keep_if_faster(holder, plan, dense_ms, sparse_ms, self.min_speedup)
            rank_zero_info(f"[2:4] whole model at {batch} x {seq} tokens: dense {dense_ms:.3f} ms, 2:4 "
                           f"{sparse_ms:.3f} ms ({dense_ms / sparse_ms:.2f}x): "
                           + ("2:4 kept" if kept else "not faster, every layer stays dense"))
        rank_zero_info(f"[2:4] {plan.choice}")
        return holder["net"]

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)
        sparse = self._sparse_copy(pl_module)
        # The dense variant runs a copy too (the same tensors): hooks on the module's own layers
        # (callbacks.OutlierFeatures) see only the module's pass, and never run inside a capture.
        with torch.inference_mode(False):
            dense = shared_copy(pl_module.net).eval()
        self._timers = {DENSE: ReplayTimer(self._runner(dense)), self.prefix: ReplayTimer(self._runner(sparse))}
        for prefix, timer in self._timers.items():
            pl_module.add_eval_variant(prefix, timer)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._timers:
            for key, value in self._speed().items():
                pl_module.log(key, value, sync_dist=False)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._timers:
            return
        speed = self._speed()
        self._release(pl_module)
        metrics, p = trainer.callback_metrics, self.prefix
        self.results = {k: float(metrics[k]) for k in (f"{DENSE}/acc", f"{DENSE}/loss", f"{p}/acc", f"{p}/loss")
                        if k in metrics}
        self.results.update(speed)
        r = {k: self.results.get(k, float("nan")) for k in (f"{DENSE}/acc", f"{DENSE}/loss", f"{p}/acc", f"{p}/loss")}
        rank_zero_info(
            "[2:4] graphed test pass    | acc    | loss   | tokens/s\n"
            f"[2:4] dense                | {r[f'{DENSE}/acc']:.4f} | {r[f'{DENSE}/loss']:.4f} | "
            f"{speed[f'{DENSE}/tokens_per_s']:,.0f}\n"
            f"[2:4] 2:4 (with fallbacks) | {r[f'{p}/acc']:.4f} | {r[f'{p}/loss']:.4f} | "
            f"{speed[f'{p}/tokens_per_s']:,.0f} ({speed[f'{p}/speedup']:.2f}x)")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release(pl_module)
        pl_module.inference_runner = None

    def _release(self, pl_module: LightningModule) -> None:
        for prefix in self._timers:
            if prefix in getattr(pl_module, "eval_variants", []):
                pl_module.remove_eval_variant(prefix)
        self._timers = {}

    def _speed(self) -> dict[str, float]:
        dense, sparse = self._timers[DENSE].tokens_per_s, self._timers[self.prefix].tokens_per_s
        return {f"{DENSE}/tokens_per_s": dense, f"{self.prefix}/tokens_per_s": sparse,
                f"{self.prefix}/speedup": sparse / dense if math.isfinite(dense) and dense else float("nan"),
                f"{self.prefix}/dense_fallbacks": float(len(self.plan.choice.dense))}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)
        pl_module.inference_runner = self._runner(self._sparse_copy(pl_module))

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.inference_runner = None
