"""2:4 export for inference: one cuSPARSELt call per layer, its algorithm search, a per-layer dense fallback.

* :func:`sparse24_linear`: ``F.linear`` of a cuSPARSELt 2:4 weight as ONE ``_cslt_sparse_mm``
  call with the bias fused and a row-major output; :func:`install_direct_forward` routes a
  Linear through it (eager, hand-captured graphs and ``torch.compile`` alike).
* :func:`linear_timing_table` times each selected Linear dense vs 2:4 inside CUDA graphs at the
  bucket's token count (optionally with cuSPARSELt's search, :func:`search_alg_id`);
  :func:`choose_sparse_layers`, a pure function of that table, keeps 2:4 only where it is
  faster; :func:`prepare_sparse24` exports those layers, the others stay dense and are reported;
  :func:`keep_if_faster` then compares the whole model and reverts to dense unless faster.

The private cuSPARSELt calls are in :mod:`models.private_hooks`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.bucketed_runner import graphed_ms
from models.nm_sparsity import export_sparse_24, select_linears, semi_structured_refusal
from models.private_hooks import DEFAULT_CONFIG, cslt_search, cslt_sparse_mm, cusparselt_packed, \
    override_forward, sparse24_linear_op

__all__ = ["DEFAULT_CONFIG", "LayerTiming", "FallbackChoice", "choose_sparse_layers", "sparse24_linear",
           "install_direct_forward", "direct_matches_torch", "search_alg_id", "linear_timing_table",
           "Sparse24Plan", "prepare_sparse24", "restore_weights", "keep_if_faster"]


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


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: tuple[int, int, int] = DEFAULT_CONFIG, mm: Callable | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a cuSPARSELt 2:4 ``weight`` as ONE ``_cslt_sparse_mm`` call.

    ``x`` ``(..., in)`` is flattened to a contiguous ``(N, in)``; cuSPARSELt computes
    ``W (out, in) @ x.T (in, N)`` with the bias fused and writes it column-major
    (``transpose_result=True``), i.e. a contiguous row-major ``(N, out)``: no transpose, copy or
    separate bias kernel around the GEMM, and the output feeds the next op (attention heads,
    LayerNorm) in the layout dense ``F.linear`` gives. ``config`` is ``(alg_id, split_k,
    split_k_mode)`` from :func:`search_alg_id`. ``mm(packed, x2.t(), bias, config)`` replaces
    :func:`models.private_hooks.cslt_sparse_mm` (tests). ``N`` must be a multiple of 8.
    """
    packed = cusparselt_packed(weight)
    if packed is None:
        raise TypeError(f"sparse24_linear: weight must be a cuSPARSELt 2:4 tensor "
                        f"(torch.sparse.to_sparse_semi_structured), got {type(weight).__name__}")
    return _packed_linear(x, packed, bias, config, mm or cslt_sparse_mm)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   config: tuple[int, int, int], mm: Callable) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():  # e.g. a transposed view: the plan (and a searched alg id) assume row-major x
        x2 = x2.contiguous()
    out = mm(packed, x2.t(), bias, config)
    return out.view(*x.shape[:-1], out.shape[-1])


def _direct_ok(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    rows = x.numel() // max(1, x.shape[-1])
    return packed is not None and rows % 8 == 0 and x.dtype == packed.dtype


def _direct_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of an exported Linear through one cuSPARSELt call (see :func:`install_direct_forward`)."""
    packed = getattr(layer, "_sparse24_packed", None)
    if not getattr(layer, "_sparse24_direct", True) or not _direct_ok(x, packed):
        return F.linear(x, layer.weight, layer.bias)
    config = getattr(layer, "_sparse24_config", DEFAULT_CONFIG)
    if torch.compiler.is_compiling():  # torch's fake kernel gets the shape wrong: our custom op
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        return sparse24_linear_op(x2, packed, layer.bias, layer.out_features, config).view(
            *x.shape[:-1], layer.out_features)
    try:
        return _packed_linear(x, packed, layer.bias, config, cslt_sparse_mm)
    except (RuntimeError, TypeError) as err:  # a cuSPARSELt refusal happens before any launch: safe to retry
        if tuple(config) != DEFAULT_CONFIG:
            warnings.warn(f"2:4 layer {tuple(layer.weight.shape)}: cuSPARSELt config {tuple(config)} failed "
                          f"({str(err)[:120]}); using the default (alg 0) for this layer", stacklevel=2)
            layer._sparse24_config = DEFAULT_CONFIG
            try:
                return _packed_linear(x, packed, layer.bias, DEFAULT_CONFIG, cslt_sparse_mm)
            except (RuntimeError, TypeError) as err0:
                err = err0
        warnings.warn(f"2:4 layer {tuple(layer.weight.shape)}: direct cuSPARSELt call failed ({str(err)[:120]}); "
                      f"using torch's F.linear path for this layer", stacklevel=2)
        layer._sparse24_direct = False
        return F.linear(x, layer.weight, layer.bias)


def install_direct_forward(layer: nn.Linear, config: tuple[int, int, int] | None = DEFAULT_CONFIG) -> None:
    """Route ``layer`` (a Linear with a 2:4 weight) through :func:`sparse24_linear` with ``config``
    (``(alg_id, split_k, split_k_mode)``); ``config=None`` undoes it.

    torch's ``F.linear`` on a ``SparseSemiStructuredTensor`` goes through its ``__torch_dispatch__``
    (view, ``t``, ``addmm``, padding checks) and, in some torch versions, returns a transposed
    (column-major) output that makes the following ops (heads, SDPA, LayerNorm) slower or copy.
    A layer whose config fails falls back to the default config, then to ``F.linear`` (warnings).
    The packed tensor is also kept as a non-persistent buffer, so that ``torch.compile`` sees a
    plain static tensor (not the tensor subclass) and its CUDA graphs do not copy it per replay.
    """
    for key in ("_sparse24_direct", "_sparse24_config"):
        layer.__dict__.pop(key, None)
    layer._buffers.pop("_sparse24_packed", None)
    override_forward(layer, None)
    if config is None:
        return
    layer._sparse24_config = tuple(int(v) for v in config)
    packed = cusparselt_packed(layer.weight)
    if packed is not None:
        layer.register_buffer("_sparse24_packed", packed, persistent=False)
    override_forward(layer, _direct_forward)


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
    packed = cusparselt_packed(sparse_weight)
    if packed is None:
        return DEFAULT_CONFIG
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    try:
        found = cslt_search(packed, x2.t(), bias)
        sparse24_linear(x2, sparse_weight, bias, found)
        torch.cuda.synchronize()
        return found
    except Exception:  # a wrapper without the search, a refused shape or config
        return DEFAULT_CONFIG


def linear_timing_table(layers: dict[str, nn.Linear], tokens: int, alg_search: bool = False,
                        calls: int = 20, direct: bool = True) -> dict[str, LayerTiming]:
    """Dense vs 2:4 time of each layer at ``tokens`` input rows, inside CUDA graphs.

    Layers of equal ``(out, in, dtype, bias)`` are timed once. Weights must be CUDA fp16/bf16
    and 2:4 sparse (each is compressed once here for timing; the layers are not changed).
    2:4 is timed through :func:`sparse24_linear`, the call the exported layers make (``direct=False``:
    through torch's ``F.linear``, without the search). With ``alg_search`` cuSPARSELt's search
    picks the config per shape (searched and run on this very call; a failing config is
    dropped); the faster of it and the default is kept.
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
                use_direct = direct and _direct_ok(x, cusparselt_packed(ws))
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
