"""Every private torch / transformers API that graphed 2:4 inference touches, one function each.

The rest of :mod:`models.sparse_inference` (:mod:`models.bucketed_runner`,
:mod:`models.sparse24_export`) calls only these functions, and
``tests/models/test_private_hooks.py`` checks each against the installed libraries, so a library
upgrade that moves one fails one named test instead of a benchmark on a GPU. Each docstring says
what the function relies on, the versions it was checked on (torch 2.11 + transformers 5.17 on
the GPU machines, torch 2.14 + transformers 5.24 on the CPU ones) and what breaks if it changes.

| hook | private API |
|---|---|
| :func:`cslt_sparse_mm` | ``torch._cslt_sparse_mm`` (its ``transpose_result``/``alg_id``/``split_k`` arguments) |
| :func:`cslt_search` | ``torch._C._cusparselt.mm_search``, else ``torch._cslt_sparse_mm_search`` |
| :func:`cusparselt_packed` | ``SparseSemiStructuredTensorCUSPARSELT`` and its ``packed`` field |
| :func:`sparse24_linear_op` | our op ``lit::sparse24_linear``: torch's fake ``_cslt_sparse_mm`` misreads 1-D ``packed`` |
| :func:`override_forward` | an instance ``forward`` attribute shadowing ``nn.Module.forward`` |
| :func:`no_mask_while_capturing` | patches ``transformers.masking_utils._ignore_bidirectional_mask_sdpa`` |
| :func:`additive_mask` | transformers passes a 4-D mask to attention as given |
| :func:`capture_graph` | ``torch.cuda.graph(..., capture_error_mode="thread_local")`` |
| :func:`raise_recompile_limit` | ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` before) |
| :func:`compile_counters` | ``torch._dynamo.utils.counters`` (graph breaks, skipped cudagraphs) |
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

DEFAULT_CONFIG = (0, 1, -1)  # cuSPARSELt's default plan: (alg_id, split_k, split_k_mode)

__all__ = ["DEFAULT_CONFIG", "cslt_sparse_mm", "cslt_search", "cusparselt_packed", "sparse24_linear_op",
           "override_forward", "no_mask_while_capturing", "additive_mask", "capture_graph",
           "raise_recompile_limit", "compile_counters"]


# ---------------------------------------------------------------- cuSPARSELt

def cslt_sparse_mm(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None,
                   config: tuple[int, int, int] = DEFAULT_CONFIG) -> torch.Tensor:
    """``torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, alg_id, split_k, split_k_mode)``.

    Relies on: the aten op ``_cslt_sparse_mm(Tensor compressed_A, Tensor dense_B, Tensor? bias,
    Tensor? alpha, ScalarType? out_dtype, bool transpose_result, int alg_id, int split_k,
    int split_k_mode)`` computing ``A (out, in) @ B (in, N) + bias[:, None]`` and, with
    ``transpose_result``, writing it as a row-major ``(N, out)``. Checked on torch 2.11 and 2.14
    (``split_k``/``split_k_mode`` are the newest arguments; the default ``(1, -1)`` is not
    passed, so an older torch still runs the default config). If the op is renamed or its
    arguments change, every exported 2:4 layer falls back to torch's ``F.linear`` (with a
    warning), slower and with a transposed output.
    """
    alg, split_k, split_k_mode = (int(v) for v in config)
    extra = {} if (split_k, split_k_mode) == (1, -1) else {"split_k": split_k, "split_k_mode": split_k_mode}
    return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, alg_id=alg, **extra)


def cslt_search(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """cuSPARSELt's fastest ``(alg_id, split_k, split_k_mode)`` for :func:`cslt_sparse_mm` on these operands.

    Relies on: ``torch._C._cusparselt.mm_search(compressed_A, dense_B, bias, alpha, out_dtype,
    transpose_result)`` returning ``(alg_id, split_k, split_k_mode, max_alg_id)`` (torch 2.11,
    2.14), else the deprecated ``torch._cslt_sparse_mm_search(..., transpose_result=True)``
    returning the alg id alone. Raises whatever they raise (no cuSPARSELt, a refused shape); if
    both disappear, ``alg_search=True`` finds nothing and every layer keeps the default config,
    which lost to dense end to end on one H200 (docs/bert.md).
    """
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is not None:
        try:
            return tuple(int(v) for v in search(packed, dense_t, bias, None, None, True)[:3])
        except (TypeError, RuntimeError, ValueError):
            pass  # an older binding: try the deprecated search below
    return int(torch._cslt_sparse_mm_search(packed, dense_t, bias=bias, transpose_result=True)), 1, -1


def cusparselt_packed(weight: object) -> torch.Tensor | None:
    """The compressed cuSPARSELt tensor of a 2:4 weight; ``None`` for anything else.

    Relies on: ``torch.sparse.SparseSemiStructuredTensorCUSPARSELT`` (torch 2.1+) keeping values
    and metadata in ONE 1-D tensor, its ``packed`` field (``__slots__`` of
    ``SparseSemiStructuredTensor``: ``packed, meta, packed_t, meta_t, compressed_swizzled_bitmask``
    in torch 2.14), the layout ``_cslt_sparse_mm`` takes. If the class or the field goes, this
    returns ``None`` and exported layers run torch's ``F.linear`` path (slower, still correct).
    """
    cls = getattr(torch.sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    if cls is None or not isinstance(weight, cls):
        return None
    return getattr(weight, "packed", None)


@torch.library.custom_op("lit::sparse24_linear", mutates_args=())
def _sparse24_linear(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                     alg_id: int, split_k: int, split_k_mode: int) -> torch.Tensor:
    return cslt_sparse_mm(packed, x2.t(), bias, (alg_id, split_k, split_k_mode))


@_sparse24_linear.register_fake
def _sparse24_linear_fake(x2, packed, bias, out_features, alg_id, split_k, split_k_mode):
    return x2.new_empty((x2.shape[0], out_features))


def sparse24_linear_op(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                       config: tuple[int, int, int] = DEFAULT_CONFIG) -> torch.Tensor:
    """:func:`cslt_sparse_mm` of a row-major ``(N, in)`` ``x2`` as the custom op ``torch.ops.lit.sparse24_linear``
    -> ``(N, out_features)``: what an exported layer calls under ``torch.compile``.

    Why an op of ours: torch's fake (meta) kernel of ``_cslt_sparse_mm`` takes the output rows
    from ``compressed_A.size(0)``, which for the 1-D ``packed`` tensor is its length, not
    ``out_features`` (torch 2.11, 2.14; torch 2.14 wraps its own call the same way). Dynamo
    would trace a wrong shape and refuse the bias. Relies on ``torch.library.custom_op`` and
    ``register_fake`` (public since torch 2.4); inductor runs the op as an opaque kernel, which
    ``mode="reduce-overhead"`` records into its CUDA graph.
    """
    alg, split_k, split_k_mode = (int(v) for v in config)
    return _sparse24_linear(x2, packed, bias, int(out_features), alg, split_k, split_k_mode)


# ---------------------------------------------------------------- nn.Module

def override_forward(module: nn.Module, forward: Callable | None) -> None:
    """``module(x)`` calls ``forward(module, x)`` from now on; ``None`` puts the class's forward back.

    Relies on: ``nn.Module.__call__`` looking ``self.forward`` up on the instance, so an entry
    ``forward`` in ``module.__dict__`` shadows the class method (torch 1.x-2.14; dynamo traces a
    patched forward too, guarding on it). If that stops, exported layers silently run torch's
    ``F.linear`` path instead of the direct cuSPARSELt call.
    """
    module.__dict__.pop("forward", None)
    if forward is not None:
        module.forward = types.MethodType(forward, module)


# ---------------------------------------------------------------- transformers masking

_wrapped_ignore: list[Callable] = []  # the transformers function that _skip_unmasked delegates to


def _skip_unmasked(padding_mask, kv_length, local_attention_size=None):
    """Replacement of ``masking_utils._ignore_bidirectional_mask_sdpa`` (one object, so that dynamo's
    guard on it holds from call to call)."""
    if padding_mask is None and local_attention_size is None:
        return True  # nothing to mask and no window: no mask, no data-dependent check
    return _wrapped_ignore[-1](padding_mask, kv_length, local_attention_size)


@contextlib.contextmanager
def no_mask_while_capturing(active: bool | None = None) -> Iterator[None]:
    """Let transformers build no attention mask for an unmasked batch while a graph is captured or traced.

    transformers builds no mask when none is given, so SDPA may take its flash kernel; but
    transformers 5.17's ``masking_utils._ignore_bidirectional_mask_sdpa(padding_mask, kv_length,
    local_attention_size=None) -> bool`` asks ``is_tracing()`` first, which is true inside a CUDA
    stream capture and under dynamo, and then an all-true ``(B, 1, T, T)`` mask is materialised:
    the graph runs a masked attention kernel that the same eager call does not. Inside this
    context (``active``: default, only while the current CUDA stream captures; the compiled
    runner passes ``True``) the function returns ``True`` for ``padding_mask=None`` without a
    local window and defers to the original otherwise. transformers 5.24 already skips the
    check for ``None`` (the patch is then a no-op).

    Relies on: ``transformers.masking_utils._ignore_bidirectional_mask_sdpa`` with that
    signature, looked up as a module global by ``sdpa_mask`` (checked on 5.17 and 5.24). A
    transformers without it is left alone: graphs then run the masked kernel (same numbers,
    slower, as measured before this hook).
    """
    if active is None:
        active = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    original = getattr(masking_utils, "_ignore_bidirectional_mask_sdpa", None)
    if not active or original is None or original is _skip_unmasked:  # off, absent, or already patched
        yield
        return
    _wrapped_ignore.append(original)
    masking_utils._ignore_bidirectional_mask_sdpa = _skip_unmasked
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original
        _wrapped_ignore.pop()


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T)`` 0/1 mask -> ``(B, 1, 1, T)`` additive attention bias: 0 where 1, dtype's min where 0.

    Relies on: transformers (5.x ``masking_utils._preprocess_mask_arguments``) returning a 4-D
    mask as given, so the model makes no data-dependent check of it (such as "is nothing
    padded?", a host synchronisation that a CUDA graph cannot capture) and SDPA adds it to the
    scores. If transformers starts to rebuild 4-D masks, padded buckets may fail to capture.
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


# ---------------------------------------------------------------- CUDA graphs and torch.compile

def capture_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture ``fn()`` into a new ``torch.cuda.CUDAGraph`` -> ``(graph, fn's output)`` (not replayed yet).

    Relies on: ``torch.cuda.graph(graph, capture_error_mode="thread_local")`` (torch 1.13+):
    CUDA calls of other threads (a DataLoader's pin-memory thread) may go on during the capture;
    only this thread's unsafe calls are errors. Without the argument, captures made while data
    loads would fail.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def raise_recompile_limit(at_least: int) -> int:
    """Let dynamo keep ``at_least`` compiled variants of one function; returns the limit in force.

    Relies on: ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` in older torch;
    default 8), counted per code object: every bucket shape, with and without a mask, of every
    runner over the same ``hf_forward`` adds one. Past the limit dynamo runs the function
    eagerly with only a log line, so a "compiled" bucket would silently time eager.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), int(at_least)))
    return int(getattr(config, name))


def compile_counters() -> dict[str, int]:
    """``{"graph_breaks": n, "cudagraph_skips": n}`` so far in this process (differences tell one compile).

    Relies on: ``torch._dynamo.utils.counters`` (a ``defaultdict`` of ``Counter``), its
    ``"graph_break"`` entry and ``counters["inductor"]["cudagraph_skips"]`` (torch 2.11, 2.14).
    A compiled bucket with skipped cudagraphs runs kernels without a graph (host-bound); if the
    counters move, this reports zeros and the benchmark cannot say so.
    """
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}
