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

import contextlib
import functools
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

__all__ = ["DEFAULT_SEQ_BUCKETS", "DEFAULT_BATCH_BUCKETS", "DEFAULT_CONFIG", "check_buckets", "cap_buckets",
           "bucket_for", "pad_to_bucket", "LayerTiming", "FallbackChoice", "choose_sparse_layers", "graphed_ms",
           "sparse24_linear", "install_direct_forward", "direct_matches_torch", "search_alg_id",
           "linear_timing_table", "Sparse24Plan", "prepare_sparse24", "restore_weights", "keep_if_faster",
           "bucket_ms", "additive_mask", "no_mask_while_capturing", "hf_forward", "BucketedRunner", "timed_forward"]


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
    config: tuple[int, int, int] = (0, 1, -1)  # (alg_id, split_k, split_k_mode) of sparse_ms

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


def warm_up_for_capture(fn: Callable[[], object], calls: int = 3, device=None) -> None:
    """Run ``fn()`` ``calls`` times on a side stream, as CUDA graph capture requires (library
    handles, plans and workspaces are created outside the capture)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def graphed_ms(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median milliseconds of one ``fn()`` call, replayed from a CUDA graph of ``calls`` calls.

    The graph removes the host-side cost of each call, as :class:`BucketedRunner` does.
    """
    warm_up_for_capture(fn)
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


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: tuple[int, int, int] = (0, 1, -1), mm: Callable | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a cuSPARSELt 2:4 ``weight`` as ONE ``torch._cslt_sparse_mm`` call.

    ``x`` ``(..., in)`` is flattened to a contiguous ``(N, in)``; cuSPARSELt computes
    ``W (out, in) @ x.T (in, N)`` with the bias fused and writes it column-major
    (``transpose_result=True``), i.e. a contiguous row-major ``(N, out)``: no transpose, copy or
    separate bias kernel around the GEMM, and the output feeds the next op (attention heads,
    LayerNorm) in the layout dense ``F.linear`` gives. ``config`` is ``(alg_id, split_k,
    split_k_mode)`` from :func:`search_alg_id` (default: cuSPARSELt's default plan). ``mm``
    replaces ``torch._cslt_sparse_mm`` (same contract; tests). ``N`` must be a multiple of 8.
    """
    mm = torch._cslt_sparse_mm if mm is None else mm
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():  # e.g. a transposed view: the plan (and a searched alg id) assume row-major x
        x2 = x2.contiguous()
    alg, split_k, split_k_mode = (int(v) for v in config)
    extra = {} if (split_k, split_k_mode) == (1, -1) else {"split_k": split_k, "split_k_mode": split_k_mode}
    out = mm(weight.packed, x2.t(), bias=bias, transpose_result=True, alg_id=alg, **extra)
    return out.view(*x.shape[:-1], out.shape[-1])


DEFAULT_CONFIG = (0, 1, -1)


def _direct_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    cls = getattr(torch.sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    rows = x.numel() // max(1, x.shape[-1])
    return (cls is not None and isinstance(weight, cls) and getattr(weight, "packed", None) is not None
            and rows % 8 == 0 and x.dtype == weight.dtype)


def _direct_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of an exported Linear through :func:`sparse24_linear` (see :func:`install_direct_forward`)."""
    w = layer.weight
    state = layer.__dict__
    if not state.get("_sparse24_direct", True) or not _direct_ok(x, w):
        return F.linear(x, w, layer.bias)
    config = state.get("_sparse24_config", DEFAULT_CONFIG)
    try:
        return sparse24_linear(x, w, layer.bias, config)
    except (RuntimeError, TypeError) as err:  # a cuSPARSELt refusal happens before any launch: safe to retry
        if tuple(config) != DEFAULT_CONFIG:
            warnings.warn(f"2:4 layer {tuple(w.shape)}: cuSPARSELt config {tuple(config)} failed "
                          f"({str(err)[:120]}); using the default (alg 0) for this layer", stacklevel=2)
            state["_sparse24_config"] = DEFAULT_CONFIG
            try:
                return sparse24_linear(x, w, layer.bias, DEFAULT_CONFIG)
            except (RuntimeError, TypeError) as err0:
                err = err0
        warnings.warn(f"2:4 layer {tuple(w.shape)}: direct cuSPARSELt call failed ({str(err)[:120]}); "
                      f"using torch's F.linear path for this layer", stacklevel=2)
        state["_sparse24_direct"] = False
        return F.linear(x, w, layer.bias)


def install_direct_forward(layer: nn.Linear, config: tuple[int, int, int] | None = DEFAULT_CONFIG) -> None:
    """Route ``layer`` (a Linear with a 2:4 weight) through :func:`sparse24_linear` with ``config``
    (``(alg_id, split_k, split_k_mode)``); ``config=None`` undoes it.

    torch's ``F.linear`` on a ``SparseSemiStructuredTensor`` goes through its ``__torch_dispatch__``
    (view, ``t``, ``addmm``, padding checks) and, in some torch versions, returns a transposed
    (column-major) output that makes the following ops (heads, SDPA, LayerNorm) slower or copy.
    A layer whose config fails falls back to the default config, then to ``F.linear`` (warnings).
    """
    for key in ("_sparse24_direct", "_sparse24_config", "forward"):
        layer.__dict__.pop(key, None)
    if config is not None:
        layer.__dict__["_sparse24_config"] = tuple(int(v) for v in config)
        layer.forward = functools.partial(_direct_forward, layer)


def direct_matches_torch(weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 64) -> bool:
    """Whether :func:`sparse24_linear` gives torch's own ``F.linear`` result for this 2:4 weight
    (on random rows, to bf16/fp16 rounding); ``False`` also when either call fails."""
    try:
        with torch.no_grad():
            x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
            ours, theirs = sparse24_linear(x, weight, bias).float(), F.linear(x, weight, bias).float()
        return ours.shape == theirs.shape and bool(((ours - theirs).abs() <= 1e-2 + 2e-2 * theirs.abs()).all())
    except Exception:
        return False


def search_alg_id(sparse_weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
                  ) -> tuple[int, int, int]:
    """cuSPARSELt's best ``(alg_id, split_k, split_k_mode)`` for :func:`sparse24_linear`
    ``(x, sparse_weight, bias)``; the default ``(0, 1, -1)`` if the search or its result fails.

    The search runs on exactly the call that will run (row-major ``x``, fused bias,
    ``transpose_result=True``), and the result is run once: a config is only valid for the plan
    it was found for.
    """
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    try:
        search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
        found = None
        if search is not None:  # (alg_id, split_k, split_k_mode, max_alg_id)
            try:
                found = tuple(int(v) for v in search(sparse_weight.packed, x2.t(), bias, None, None, True)[:3])
            except (TypeError, RuntimeError, ValueError):
                found = None
        if found is None:  # the older (deprecated) search: the alg id only
            found = (int(torch._cslt_sparse_mm_search(sparse_weight.packed, x2.t(), bias=bias,
                                                      transpose_result=True)), 1, -1)
        sparse24_linear(x2, sparse_weight, bias, found)
        torch.cuda.synchronize()
        return found
    except Exception:  # an older/newer wrapper without the search, a refused shape or config
        return DEFAULT_CONFIG


def linear_timing_table(layers: dict[str, nn.Linear], tokens: int, alg_search: bool = False,
                        calls: int = 20, direct: bool = True) -> dict[str, LayerTiming]:
    """Dense vs 2:4 time of each layer at ``tokens`` input rows, inside CUDA graphs.

    Layers of equal ``(out, in, dtype, bias)`` are timed once. Weights must be CUDA fp16/bf16
    and 2:4 sparse (each is compressed once here for timing; the layers are not changed).
    2:4 is timed through :func:`sparse24_linear`, the call the exported layers make (``direct=False``:
    through torch's ``F.linear``, without the search). With
    ``alg_search`` cuSPARSELt's algorithm search picks the alg id per shape (searched and run on
    this very call; a failing alg is dropped); the faster of it and the default (0) is kept.
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
                use_direct = direct and _direct_ok(x, ws)
                alg, config = 0, DEFAULT_CONFIG
                try:
                    sparse_ms = graphed_ms((lambda: sparse24_linear(x, ws, b)) if use_direct
                                           else (lambda: F.linear(x, ws, b)), calls)
                except (RuntimeError, TypeError):  # the direct call refused: time torch's path (the layer's fallback)
                    use_direct, sparse_ms = False, graphed_ms(lambda: F.linear(x, ws, b), calls)
                if alg_search and use_direct:
                    found = search_alg_id(ws, x, b)
                    if found != DEFAULT_CONFIG:
                        try:
                            searched = graphed_ms(lambda: sparse24_linear(x, ws, b, found), calls)
                        except RuntimeError:  # a config this plan cannot run: keep the default
                            searched = float("inf")
                        if searched < sparse_ms:
                            sparse_ms, alg, config = searched, found[0], found
                by_shape[key] = LayerTiming(dense_ms, sparse_ms, tuple(w.shape), tokens, alg, config)
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
                     fallback: bool = True, direct: bool = True) -> Sparse24Plan:
    """Export the selected 2:4 Linear layers where 2:4 is faster (measured), in place.

    Args:
        module: a CUDA fp16/bf16 model whose selected Linear weights are already 2:4 sparse.
        include, exclude: regexes over module names (see :func:`models.nm_sparsity.select_linears`).
        tokens: input rows of the timing table (the bucket's ``batch * seq``).
        min_speedup: see :func:`choose_sparse_layers`.
        alg_search: search cuSPARSELt's algorithm per shape (see :func:`linear_timing_table`).
        fallback: ``False`` exports every selected layer without timing (the table stays empty).
        direct: run the exported layers through :func:`sparse24_linear` (one cuSPARSELt call,
            contiguous output; :func:`install_direct_forward`) instead of torch's ``F.linear`` path.

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
        table = linear_timing_table(layers, tokens, alg_search, direct=direct)
        choice = choose_sparse_layers(table, min_speedup)
    else:
        table, choice = {}, FallbackChoice(list(layers), [], {n: float("nan") for n in layers})
    original = {name: layers[name].weight for name in choice.sparse}
    if choice.sparse:
        keep_dense = [f"^{re.escape(name)}$" for name in choice.dense]
        export_sparse_24(module, include, exclude + keep_dense)
        checked: dict[tuple, bool] = {}  # (shape, bias) -> the direct call matches torch's F.linear
        for name in choice.sparse:  # each layer gets the config found for ITS shape (default otherwise);
            # torch's own F.linear path keeps alg 0: a searched id belongs to the direct call's plan
            layer = layers[name]
            key = (tuple(layer.weight.shape), layer.bias is not None)
            if direct and key not in checked:
                checked[key] = direct_matches_torch(layer.weight, layer.bias)
                if not checked[key]:
                    warnings.warn(f"prepare_sparse24: the direct cuSPARSELt call does not match torch's F.linear "
                                  f"for shape {key[0]}; those layers use F.linear", stacklevel=2)
            if direct and checked[key]:
                install_direct_forward(layer, table[name].config if name in table else DEFAULT_CONFIG)
    return Sparse24Plan(table, choice, original)


def restore_weights(module: nn.Module, plan: Sparse24Plan) -> None:
    """Undo :func:`prepare_sparse24`: the exported layers get their dense weights back."""
    for name, weight in plan.original.items():
        layer = module.get_submodule(name)
        install_direct_forward(layer, None)
        layer.weight = weight


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


@contextlib.contextmanager
def no_mask_while_capturing(active: bool | None = None):
    """Let transformers skip the attention mask of an unmasked batch while a CUDA graph is captured.

    transformers (5.x) builds no mask when none is given, so SDPA takes its flash kernel, but it
    counts CUDA stream capture as "tracing" and then materialises an all-true ``(B, 1, T, T)``
    mask instead: a captured graph would run a masked attention kernel that the same eager call
    does not. Inside this context (``active``: default, only while the current stream captures)
    ``masking_utils._ignore_bidirectional_mask_sdpa`` returns ``True`` for ``padding_mask=None``
    without a local-attention window (nothing to mask and no data-dependent check); any other
    case goes to the original. A transformers without that function is left alone.
    """
    if active is None:
        active = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    original = getattr(masking_utils, "_ignore_bidirectional_mask_sdpa", None)
    if not active or original is None:
        yield
        return

    def ignore(padding_mask, *args, **kwargs):
        local = kwargs.get("local_attention_size", args[1] if len(args) > 1 else None)
        if padding_mask is None and local is None:
            return True
        return original(padding_mask, *args, **kwargs)

    masking_utils._ignore_bidirectional_mask_sdpa = ignore
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original


def hf_forward(net: nn.Module, output: str = "logits"
               ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``fn(input_ids, attention_mask)`` -> ``net(...).<output>`` of a transformers encoder, with
    the mask passed as :func:`additive_mask` in the dtype of ``net``'s embeddings (or no mask
    when ``attention_mask`` is ``None``: every position attends, and SDPA gets no mask, also
    inside a CUDA graph capture: :func:`no_mask_while_capturing`)."""
    dtype = net.get_input_embeddings().weight.dtype

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:  # every position attends: no mask at all
            with no_mask_while_capturing():
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
        cuda_graphs: capture graphs on CUDA inputs. ``"auto"``: capture, then time a few graph
            replays against as many eager calls of the same bucket and keep the faster for that
            bucket (a graph is not always faster: a large bucket may replay slower than eager);
            :attr:`modes` says which each bucket uses.
        drop_full_mask: call ``fn(ids, None)`` when the batch fills its bucket and its mask (if
            any) is all ones (a graph of its own; transformers then passes no mask to SDPA,
            which may use its faster flash kernel). ``fn`` must accept ``None`` as the mask.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 seq_buckets: Iterable[int] = DEFAULT_SEQ_BUCKETS,
                 batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS,
                 pad_token_id: int = 0, cuda_graphs: bool | str = True, drop_full_mask: bool = True) -> None:
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs: expected true, false or 'auto', got {cuda_graphs!r}")
        self.fn = fn
        self.seq_buckets = check_buckets(seq_buckets, "seq_buckets")
        self.batch_buckets = check_buckets(batch_buckets, "batch_buckets")
        self.pad_token_id = pad_token_id
        self.cuda_graphs = cuda_graphs
        self.drop_full_mask = drop_full_mask
        self._graphs: dict[tuple, tuple] = {}  # (batch, seq, full, device) -> (graph, ids, mask, out)
        self.modes: dict[tuple, str] = {}  # (batch, seq, full, device) -> "graph" | "eager" (auto only)
        self.timings: dict[tuple, tuple[float, float]] = {}  # same keys -> (graph ms, eager ms) (auto only)
        self.masked_fallback: str | None = None  # why full buckets run with their mask, if they do

    def reset(self) -> None:
        """Drop every captured graph (and its memory)."""
        self._graphs.clear()
        self.modes.clear()

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
        if self.modes.get(key) == "eager":  # "auto" found eager faster for this bucket
            return self.fn(ids, mask)[:b]
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
                self.drop_full_mask, self.masked_fallback = False, str(err)[:200]
                torch.cuda.synchronize(ids.device)
                return self._run(input_ids, attention_mask)
        if self.cuda_graphs == "auto" and key not in self.modes:
            self.modes[key] = self._pick(key, ids, mask)
        if self.modes.get(key) == "eager":
            return self.fn(ids, mask)[:b]
        graph, static_ids, static_mask, out = self._graphs[key]
        static_ids.copy_(ids)
        if static_mask is not None:
            static_mask.copy_(mask)
        graph.replay()
        return out[:b].clone()

    def _pick(self, key: tuple, ids: torch.Tensor, mask: torch.Tensor | None, calls: int = 5) -> str:
        """``"graph"`` or ``"eager"``: the faster, host time included, over ``calls`` runs of each."""
        graph, static_ids, static_mask, _ = self._graphs[key]
        static_ids.copy_(ids)
        if static_mask is not None:
            static_mask.copy_(mask)

        def ms(run: Callable[[], object]) -> float:
            run()
            torch.cuda.synchronize(ids.device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            torch.cuda.synchronize(ids.device)
            return (time.perf_counter() - start) * 1e3 / calls

        graph_ms, eager_ms = ms(graph.replay), ms(lambda: self.fn(ids, mask))
        self.timings[key] = (graph_ms, eager_ms)
        if eager_ms < graph_ms:
            del self._graphs[key]  # its memory back; this bucket runs eagerly from now on
            return "eager"
        return "graph"

    def _capture(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        static_ids, static_mask = ids.clone(), None if mask is None else mask.clone()
        warm_up_for_capture(lambda: self.fn(static_ids, static_mask), 2, ids.device)
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
