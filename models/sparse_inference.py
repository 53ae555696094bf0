"""Fast 2:4 inference: static-shape buckets, CUDA graphs, and a per-layer dense fallback.

An eager ``F.linear`` with a ``SparseSemiStructuredTensor`` weight pays a fixed host-side cost
(cuSPARSELt set-up inside torch's wrapper, about 0.5 ms per call on one H200), larger than the
whole GEMM at BERT sizes. Replaying a CUDA graph skips that host work and leaves the sparse
kernel, which is faster than cuBLAS's dense one for most BERT-base/large GEMMs. This module

* pads a batch to a static ``(batch, sequence)`` bucket (:func:`bucket_for`, :func:`pad_to_bucket`):
  padded key positions get ``attention_mask = 0`` so the real tokens' outputs are those of the
  unpadded batch; padded rows are dropped from the output;
* runs a model through :class:`BucketedRunner`, which captures one CUDA graph per bucket on its
  first use and replays it afterwards (eagerly on the CPU, for tests). The dense and the 2:4
  model go through the same runner, so their comparison is fair;
* measures each selected Linear layer dense vs 2:4 inside CUDA graphs at the bucket's token
  count (:func:`linear_timing_table`), keeps 2:4 only where it is faster
  (:func:`choose_sparse_layers`, a pure function of that table) and exports those layers
  (:func:`prepare_sparse24`); the others stay dense and are reported. :func:`keep_if_faster`
  then compares the whole model, dense vs exported, and reverts to dense unless it is faster.

Shapes: ``B`` batch rows, ``T`` tokens per row; buckets ``(B*, T*)`` with ``B* >= B``, ``T* >= T``.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.nm_sparsity import export_sparse_24, select_linears, semi_structured_refusal

DEFAULT_SEQ_BUCKETS = (32, 64, 128, 256, 512)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

__all__ = ["DEFAULT_SEQ_BUCKETS", "DEFAULT_BATCH_BUCKETS", "check_buckets", "cap_buckets", "bucket_for",
           "pad_to_bucket", "LayerTiming", "FallbackChoice", "choose_sparse_layers", "graphed_ms",
           "search_alg_id", "linear_timing_table", "Sparse24Plan", "prepare_sparse24",
           "restore_weights", "keep_if_faster", "bucket_ms", "additive_mask", "hf_forward",
           "BucketedRunner", "timed_forward"]


def check_buckets(values: Iterable[int], field_name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated positive bucket sizes; ``ValueError`` naming ``field_name`` otherwise."""
    try:
        buckets = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field_name}: expected a list of positive integers, got {values!r}") from err
    if not buckets or buckets[0] < 1:
        raise ValueError(f"{field_name}: expected a non-empty list of positive integers, got {values!r}")
    return buckets


def cap_buckets(buckets: Sequence[int], limit: int) -> tuple[int, ...]:
    """Buckets above ``limit`` (e.g. a model's ``max_position_embeddings``) replaced by ``limit``."""
    return tuple(sorted({min(b, limit) for b in buckets}))


def bucket_for(size: int, buckets: Sequence[int], field_name: str = "buckets") -> int:
    """The smallest bucket ``>= size``; ``ValueError`` when ``size`` exceeds the largest one."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"{field_name}: {size} is larger than the largest bucket {max(buckets)}; "
                     f"add a bucket >= {size} (or truncate the inputs)")


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, seq: int,
                  pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` ids and mask -> ``(batch, seq)`` ones, padded on the right and at the bottom.

    Padded positions of real rows get mask 0 (attention ignores them, so real outputs do not
    change); padded rows are pad tokens with only their first position unmasked (a fully
    masked row would be a softmax over nothing), and their outputs are to be dropped.
    """
    b, t = input_ids.shape
    if b > batch or t > seq:
        raise ValueError(f"pad_to_bucket: batch {tuple(input_ids.shape)} does not fit the bucket ({batch}, {seq})")
    ids = input_ids.new_full((batch, seq), pad_token_id)
    ids[:b, :t] = input_ids
    mask = input_ids.new_zeros((batch, seq))
    mask[:b, :t] = 1 if attention_mask is None else attention_mask.to(mask.dtype)
    mask[b:, 0] = 1
    return ids, mask


@dataclass(frozen=True)
class LayerTiming:
    """Milliseconds of one Linear at ``tokens`` input rows, dense (cuBLAS) and 2:4 (cuSPARSELt)."""

    dense_ms: float
    sparse_ms: float
    shape: tuple[int, int] = (0, 0)  # (out, in)
    tokens: int = 0
    alg_id: int = 0  # cuSPARSELt algorithm used for sparse_ms

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("inf")


@dataclass
class FallbackChoice:
    """Which layers run 2:4 and which fall back to dense, with each layer's measured speed-up."""

    sparse: list[str]
    dense: list[str]
    speedups: dict[str, float]

    def __str__(self) -> str:
        fell = ", ".join(f"{n} ({self.speedups.get(n, float('nan')):.2f}x)" for n in self.dense) or "none"
        return f"2:4 on {len(self.sparse)} layer(s); dense fallback on {len(self.dense)}: {fell}"


def choose_sparse_layers(table: dict[str, LayerTiming | tuple[float, float]],
                         min_speedup: float = 1.0) -> FallbackChoice:
    """Keep 2:4 on a layer only when ``dense_ms / sparse_ms > min_speedup`` in ``table``.

    Args:
        table: layer name -> :class:`LayerTiming` or ``(dense_ms, sparse_ms)``.
        min_speedup: the speed-up a layer's 2:4 kernel must beat (1.0: strictly faster than dense;
            raise it, e.g. 1.03, to keep dense where the two are within timing noise).

    Returns:
        :class:`FallbackChoice`, names in the table's order. A layer with a non-finite or
        non-positive time falls back to dense.
    """
    if not min_speedup > 0:
        raise ValueError(f"min_speedup: must be > 0, got {min_speedup!r}")
    sparse, dense, speedups = [], [], {}
    for name, timing in table.items():
        dense_ms, sparse_ms = (timing.dense_ms, timing.sparse_ms) if isinstance(timing, LayerTiming) else timing
        ok = all(v == v and 0 < v < float("inf") for v in (dense_ms, sparse_ms))
        speedups[name] = dense_ms / sparse_ms if ok else 0.0
        (sparse if ok and speedups[name] > min_speedup else dense).append(name)
    return FallbackChoice(sparse, dense, speedups)


def graphed_ms(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median milliseconds of one ``fn()`` call, replayed from a CUDA graph of ``calls`` calls.

    The graph removes the host-side cost of each call, as :class:`BucketedRunner` does.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def search_alg_id(sparse_weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> int:
    """cuSPARSELt's best algorithm for ``F.linear(x, sparse_weight, bias)`` (0 if the search fails)."""
    try:
        return int(torch._cslt_sparse_mm_search(sparse_weight.packed, x.t(), bias=bias))
    except Exception:  # an older/newer wrapper without the search, or a refused shape
        return 0


def linear_timing_table(layers: dict[str, nn.Linear], tokens: int, alg_search: bool = False,
                        calls: int = 20) -> dict[str, LayerTiming]:
    """Dense vs 2:4 time of each layer at ``tokens`` input rows, inside CUDA graphs.

    Layers of equal ``(out, in, dtype, bias)`` are timed once. Weights must be CUDA fp16/bf16
    and 2:4 sparse (each is compressed once here for timing; the layers are not changed).
    With ``alg_search`` cuSPARSELt's algorithm search picks the alg id per shape
    (``torch._cslt_sparse_mm_search``); the faster of it and the default is kept.
    """
    from torch.sparse import to_sparse_semi_structured

    by_shape: dict[tuple, LayerTiming] = {}
    table = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            w = layer.weight.detach()
            key = (tuple(w.shape), w.dtype, layer.bias is not None)
            if key not in by_shape:
                x = torch.randn(tokens, w.shape[1], device=w.device, dtype=w.dtype)
                b = None if layer.bias is None else layer.bias.detach()
                ws = to_sparse_semi_structured(w.contiguous())
                dense_ms = graphed_ms(lambda: F.linear(x, w, b), calls)
                sparse_ms = graphed_ms(lambda: F.linear(x, ws, b), calls)
                alg = 0
                if alg_search:
                    found = search_alg_id(ws, x, b)
                    if found:
                        ws.alg_id_cusparselt = found
                        try:
                            searched = graphed_ms(lambda: F.linear(x, ws, b), calls)
                        except RuntimeError:  # an algorithm the wrapper cannot run: keep the default
                            searched = float("inf")
                        if searched < sparse_ms:
                            sparse_ms, alg = searched, found
                by_shape[key] = LayerTiming(dense_ms, sparse_ms, tuple(w.shape), tokens, alg)
                del ws, x
            table[name] = by_shape[key]
    return table


@dataclass
class Sparse24Plan:
    """What :func:`prepare_sparse24` did: the timing table, the choice, the replaced weights."""

    table: dict[str, LayerTiming]
    choice: FallbackChoice
    original: dict[str, nn.Parameter] = field(default_factory=dict)  # name -> dense weight
    whole_model_ms: tuple[float, float] | None = None  # (dense, 2:4) of the whole model, if timed


def prepare_sparse24(module: nn.Module, include: Iterable[str], exclude: Iterable[str] = (),
                     tokens: int = 4096, min_speedup: float = 1.0, alg_search: bool = False,
                     fallback: bool = True) -> Sparse24Plan:
    """Export the selected 2:4 Linear layers where 2:4 is faster (measured), in place.

    Args:
        module: a CUDA fp16/bf16 model whose selected Linear weights are already 2:4 sparse.
        include, exclude: regexes over module names (see :func:`models.nm_sparsity.select_linears`).
        tokens: input rows of the timing table (the bucket's ``batch * seq``).
        min_speedup: see :func:`choose_sparse_layers`.
        alg_search: search cuSPARSELt's algorithm per shape (see :func:`linear_timing_table`).
        fallback: ``False`` exports every selected layer without timing (the table stays empty).

    Returns:
        A :class:`Sparse24Plan`; :func:`restore_weights` puts the dense weights back.
    """
    include, exclude = list(include), list(exclude)
    layers = select_linears(module, include, exclude)
    if not layers:
        raise ValueError(f"include: no nn.Linear matches {include!r} (minus {exclude!r})")
    refusals = {name: why for name, layer in layers.items()
                if (why := semi_structured_refusal(layer.weight)) is not None}
    if refusals:
        lines = "\n".join(f"  {name}: {why}" for name, why in refusals.items())
        raise ValueError(f"prepare_sparse24: {len(refusals)} layer(s) cannot be exported to 2:4:\n{lines}\n"
                         f"exclude them (exclude=[...]) or fix them as said")
    if fallback:
        table = linear_timing_table(layers, tokens, alg_search)
        choice = choose_sparse_layers(table, min_speedup)
    else:
        table, choice = {}, FallbackChoice(list(layers), [], {n: float("nan") for n in layers})
    original = {name: layers[name].weight for name in choice.sparse}
    if choice.sparse:
        keep_dense = [f"^{re.escape(name)}$" for name in choice.dense]
        export_sparse_24(module, include, exclude + keep_dense)
        for name in choice.sparse:
            if name in table and table[name].alg_id:
                layers[name].weight.alg_id_cusparselt = table[name].alg_id
    return Sparse24Plan(table, choice, original)


def restore_weights(module: nn.Module, plan: Sparse24Plan) -> None:
    """Undo :func:`prepare_sparse24`: the exported layers get their dense weights back."""
    for name, weight in plan.original.items():
        module.get_submodule(name).weight = weight


def keep_if_faster(module: nn.Module, plan: Sparse24Plan, dense_ms: float, sparse_ms: float,
                   min_speedup: float = 1.0) -> bool:
    """Whole-model check after :func:`prepare_sparse24`: keep the export only if it is faster.

    ``dense_ms`` and ``sparse_ms`` are the whole model's times (same path, same bucket) before
    and after the export. Unless ``dense_ms / sparse_ms > min_speedup``, the dense weights come
    back and every layer is reported as a dense fallback. Records the times in ``plan``.

    Returns:
        ``True`` when the 2:4 export is kept.
    """
    plan.whole_model_ms = (dense_ms, sparse_ms)
    if plan.choice.sparse and sparse_ms > 0 and dense_ms / sparse_ms > min_speedup:
        return True
    restore_weights(module, plan)
    plan.original = {}
    plan.choice = FallbackChoice([], plan.choice.sparse + plan.choice.dense, plan.choice.speedups)
    return False


def bucket_ms(runner: BucketedRunner, batch: int, seq: int, vocab_size: int, device: torch.device | str,
              iters: int = 10) -> float:
    """Median milliseconds of ``runner`` on a random unpadded ``(batch, seq)`` batch (graph captured first)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (batch, seq), generator=gen).to(device)
    for _ in range(3):
        runner(ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner(ids)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T)`` 0/1 mask -> ``(B, 1, 1, T)`` additive attention bias: 0 where 1, dtype's min where 0.

    transformers uses a 4-D mask as given, so the model does no data-dependent check of the mask
    (such as "is nothing padded?", a host synchronisation that a CUDA graph cannot capture).
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def hf_forward(net: nn.Module, output: str = "logits"
               ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``fn(input_ids, attention_mask)`` -> ``net(...).<output>`` of a transformers encoder, with
    the mask passed as :func:`additive_mask` in the dtype of ``net``'s embeddings (or no mask
    when ``attention_mask`` is ``None``: every position attends)."""
    dtype = net.get_input_embeddings().weight.dtype

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:  # every position attends: no mask at all
            return getattr(net(input_ids=input_ids), output)
        return getattr(net(input_ids=input_ids, attention_mask=additive_mask(attention_mask, dtype)), output)

    return fn


class BucketedRunner:
    """Run ``fn(input_ids, attention_mask)`` on static-shape buckets, from CUDA graphs on the GPU.

    A batch of ``(B, T)`` is padded to the smallest ``(batch bucket, seq bucket)`` that holds it
    (batches above the largest batch bucket are split), the bucket's graph is captured on first
    use and replayed afterwards; the output's first ``B`` rows are returned (a copy). On the CPU,
    or with ``cuda_graphs=False``, the padded batch runs eagerly: same numbers, no graph.

    A graph holds the addresses of the weights it was captured with: after changing weights
    (e.g. :func:`prepare_sparse24`), call :meth:`reset` or use a new runner.

    Args:
        fn: returns a tensor whose first dimension is the batch (e.g. logits ``(B, C)``).
        seq_buckets, batch_buckets: bucket sizes (sorted and de-duplicated here).
        pad_token_id: id written into padded positions.
        cuda_graphs: capture graphs on CUDA inputs.
        drop_full_mask: call ``fn(ids, None)`` when the batch fills its bucket and its mask (if
            any) is all ones (a graph of its own; transformers then passes no mask to SDPA,
            which may use its faster flash kernel). ``fn`` must accept ``None`` as the mask.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 seq_buckets: Iterable[int] = DEFAULT_SEQ_BUCKETS,
                 batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS,
                 pad_token_id: int = 0, cuda_graphs: bool = True, drop_full_mask: bool = True) -> None:
        self.fn = fn
        self.seq_buckets = check_buckets(seq_buckets, "seq_buckets")
        self.batch_buckets = check_buckets(batch_buckets, "batch_buckets")
        self.pad_token_id = pad_token_id
        self.cuda_graphs = cuda_graphs
        self.drop_full_mask = drop_full_mask
        self._graphs: dict[tuple, tuple] = {}  # (batch, seq, full, device) -> (graph, ids, mask, out)

    def reset(self) -> None:
        """Drop every captured graph (and its memory)."""
        self._graphs.clear()

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The ``(batch, seq)`` buckets with a graph."""
        return [(b, t) for b, t, _, _ in self._graphs]

    def bucket(self, batch: int, seq: int) -> tuple[int, int]:
        return (bucket_for(batch, self.batch_buckets, "batch_buckets"),
                bucket_for(seq, self.seq_buckets, "seq_buckets"))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (batch, tokens), got shape {tuple(input_ids.shape)}")
        step = self.batch_buckets[-1]
        outputs = []
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], step):
                ids = input_ids[start:start + step]
                mask = None if attention_mask is None else attention_mask[start:start + step]
                outputs.append(self._run(ids, mask))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, t = input_ids.shape
        batch, seq = self.bucket(b, t)
        ids, mask = pad_to_bucket(input_ids, attention_mask, batch, seq, self.pad_token_id)
        if self.drop_full_mask:
            # Nothing padded: no mask at all (SDPA may then take its flash kernel). Only a given
            # mask needs a look at its values (one host synchronisation).
            exact = (b, t) == (batch, seq)
            full = exact if attention_mask is None else exact and bool(attention_mask.all())
            mask = None if full else mask
        if not (self.cuda_graphs and ids.is_cuda):
            return self.fn(ids, mask)[:b]
        key = (batch, seq, mask is None, ids.device)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(ids, mask)
            except RuntimeError as err:
                if mask is not None:
                    raise
                # Some transformers versions look at the ids when no mask is given (a padding
                # warning): a host synchronisation that a graph cannot capture. Masked graphs only.
                warnings.warn(f"BucketedRunner: the model cannot be captured without a mask ({err}); "
                              f"running every batch with its mask (drop_full_mask=False)", stacklevel=2)
                self.drop_full_mask = False
                torch.cuda.synchronize(ids.device)
                return self._run(input_ids, attention_mask)
        graph, static_ids, static_mask, out = self._graphs[key]
        static_ids.copy_(ids)
        if static_mask is not None:
            static_mask.copy_(mask)
        graph.replay()
        return out[:b].clone()

    def _capture(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        static_ids, static_mask = ids.clone(), None if mask is None else mask.clone()
        stream = torch.cuda.Stream(device=ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(stream):  # warm-up: library handles, plans, workspaces
            for _ in range(2):
                self.fn(static_ids, static_mask)
        torch.cuda.current_stream(ids.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread) may go on
        # during the capture; only this thread's unsafe calls are errors.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(static_ids, static_mask)
        return graph, static_ids, static_mask, out


def timed_forward(runner: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, float]:
    """``(runner(ids, mask), seconds)`` with the device synchronised before and after."""
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = runner(input_ids, attention_mask)
    sync()
    return out, time.perf_counter() - start
