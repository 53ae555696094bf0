"""LLM.int8(): int8 matrix multiplication with a 16-bit outlier decomposition.

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale" (arXiv 2208.07339), section 3. For activations ``X`` ``(S, H)`` and a Linear weight
``W`` ``(O, H)`` (PyTorch's ``(out, in)`` layout) with threshold ``alpha`` (6.0):

    Oc  = {j : max_i |X_ij| >= alpha}                        # outlier feature columns
    c_x = absmax of each row of X[:, not Oc]                 # one scale per token
    c_w = absmax of each row of W                            # one scale per output feature
    Y   = (round(127 X/c_x) @int32 round(127 W/c_w)^T) * c_x c_w^T / 127^2  +  X[:, Oc] @ W[:, Oc]^T

The int8 part accumulates in int32 (``torch._int_mm``; on CUDA in its fast layout: ``A`` row-major
and ``B`` column-major, which is the stored ``(O, H)`` int8 weight transposed). The outlier part
runs in the activations' dtype (16-bit on a GPU).

Where the paper is silent, or where we chose:

* **Which 16-bit weight columns are kept.** The paper multiplies outlier columns with 16-bit
  weights and argues the memory cost is negligible because outlier dimensions are few and
  *systematic*. Keeping the whole 16-bit weight would cost 1.5x the 16-bit memory, so
  :class:`Int8Linear` keeps the original 16-bit columns of a given set of input dimensions
  (``fp16_dims``: the systematic outlier dimensions found on calibration data, see
  :class:`OutlierCounter`) and int8 weights for all. Outlier columns are still detected anew on
  every call, as in the paper; one that is outside ``fp16_dims`` is multiplied in 16-bit with
  its dequantized int8 weight column (what bitsandbytes does for every column). The activations
  of all outlier columns stay 16-bit, which is what matters: they would otherwise set every
  token's int8 scale.
* **Two modes.** ``outliers="dynamic"`` (the default, the paper): every column of every call
  is checked. ``outliers="calibrated"``: only the kept ``fp16_dims`` can leave the int8 part;
  each of them does on the calls where it reaches the threshold. An outlier column outside the
  calibrated set then stays in the int8 part (its row scales grow, as in plain int8). The
  paper's finding that outlier dimensions are systematic is what makes this mode accurate;
  compare both with :class:`callbacks.Int8Eval`. On CUDA both modes run the same fused kernels
  (below) and differ only in which columns are read when looking for outliers.
* **Zero rows / all-outlier inputs.** A row whose non-outlier part is all zeros gets scale 0
  and int8 codes 0, so nothing divides by zero; an input whose every column is an outlier is
  computed entirely in 16-bit.
* **Scales** are float32 and the int8 part is dequantized in float32 before the sum.
* **Inputs read by several layers.** :func:`quantize_model` fuses the query, key and value
  projections of a BERT-style ``*SelfAttention`` module into one ``(3 O, H)`` :class:`Int8Linear`
  (one quantization of the shared hidden state, one wider GEMM); each original name becomes an
  :class:`Int8LinearSlice` of it. The fused layer keeps the union of the three ``fp16_dims``
  (the same set when calibrated on the shared input; otherwise more columns stay 16-bit).

**Execution.** On CUDA (``FUSED = True``, the default) :class:`Int8Linear` runs the fused Triton
path of :mod:`models.int8_triton`: a zero fill and three kernels per call (column maxima;
outlier-column lists + row quantization; an int8 GEMM whose epilogue dequantizes, adds both
16-bit outlier parts and the bias), with no host synchronisation and no data-dependent shape,
in both modes: eager, CUDA graphs and ``torch.compile`` give the paper's result whatever
columns are outliers on a call. ``FUSED = False`` (and any CPU tensor) runs the plain PyTorch
ops below, the reference: there ``dynamic`` mode finds the columns with ``nonzero`` (a host
sync; eager only). ``GEMM`` picks the fused path's int8 GEMM: ``"auto"`` (fastest per shape,
timed once), ``"triton"`` or ``"int_mm"`` (``torch._int_mm`` + a fused dequantize kernel).

Shapes: ``S`` tokens (all leading dimensions flattened), ``H`` input features, ``O`` output
features, ``K`` outlier columns, ``D`` kept 16-bit columns.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_INCLUDE", "check_threshold", "absmax_quantize", "int8_mm", "kept_slots",
           "int8_matmul_decomposed", "Int8Linear", "Int8LinearGroup", "Int8LinearSlice", "Int8Report",
           "quantize_model", "int8_refusal", "OutlierCounter", "weight_bytes"]

# Every nn.Linear inside a BERT encoder layer (Q, K, V, attention output, FFN in and out); the
# pooler and the classifier stay 16-bit (as the paper keeps embeddings and the head).
DEFAULT_INCLUDE = r"encoder\.layer\.\d+\."
Q = 127.0  # int8 codes span [-127, 127] (symmetric; -128 unused)
# On CUDA, run the fused Triton path of models.int8_triton; False runs the plain PyTorch ops
# there too (the reference; benchmarks compare both).
FUSED = True
# The fused path's int8 GEMM: "auto" (fastest per shape), "triton" or "int_mm".
GEMM = "auto"
# TRITON_INTERPRET=1 (set before Triton is imported): the fused path runs on CPU tensors too,
# through Triton's interpreter (tests of the kernels without a GPU).
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
OUTLIER_MODES = ("dynamic", "calibrated")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_threshold(threshold: float, field: str = "threshold") -> float:
    """``threshold`` as a float, > 0 (``inf`` allowed: no outlier columns, plain int8)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected a number > 0 (the paper uses 6.0), got {threshold!r}") from None
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{field}: must be > 0 (the paper uses 6.0; inf turns the 16-bit part off), "
                         f"got {threshold!r}")
    return value


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8: ``q = round(127 x / c)`` with ``c = max |x|`` of each row.

    Args:
        x: ``(..., H)`` floating tensor.

    Returns:
        ``q`` int8 ``(..., H)`` and the row absmax ``c`` float32 ``(...)``; ``x ~ q * c / 127``.
        Rows of zeros get ``c = 0`` and ``q = 0``.
    """
    c = x.detach().abs().amax(dim=-1, keepdim=True).float()
    inv = torch.where(c > 0, Q / c, torch.zeros_like(c))  # zero rows: codes 0, no division by 0
    q = torch.round(x.float() * inv).clamp_(-Q, Q).to(torch.int8)
    return q, c.squeeze(-1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def int8_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` with int32 accumulation: ``a`` int8 ``(S, H)``, ``w`` int8 ``(O, H)``.

    On CUDA this is ``torch._int_mm(a, w.t())``: a row-major and the stored ``(O, H)`` weight seen
    as column-major ``(H, O)``, the layout cuBLASLt runs fast. ``_int_mm`` wants more than 16
    rows and ``H``, ``O`` multiples of 8: other shapes are zero-padded (zeros add nothing) and
    the result sliced back. On the CPU ``_int_mm`` takes any shape.
    """
    if a.device.type != "cuda":
        return torch._int_mm(a.contiguous(), w.t())
    s, h = a.shape
    o = w.shape[0]
    ps, ph, po = max(_round_up(s, 8), 24), _round_up(h, 8), _round_up(o, 8)
    if (ps, ph) != (s, h):
        a = F.pad(a, (0, ph - h, 0, ps - s))
    if (ph, po) != (h, o):
        w = F.pad(w, (0, ph - h, 0, po - o))
    out = torch._int_mm(a.contiguous(), w.t())
    return out[:s, :o] if (ps, po) != (s, o) else out


def kept_slots(fp16_dims: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(H,)`` int32: the position of each input dimension in ``fp16_dims``, -1 where not kept."""
    slot = torch.full((in_features,), -1, dtype=torch.int32, device=fp16_dims.device)
    slot[fp16_dims] = torch.arange(fp16_dims.numel(), dtype=torch.int32, device=fp16_dims.device)
    return slot


def int8_matmul_decomposed(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_absmax: torch.Tensor,
    threshold: float = 6.0,
    fp16_dims: torch.Tensor | None = None,
    fp16_columns: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    outliers: str = "dynamic",
    kept_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LLM.int8() product ``x @ W.T + bias`` (see the module docstring for the equations).

    Args:
        x: activations ``(..., H)``, floating; the result has its dtype.
        weight_int8: ``(O, H)`` int8 codes of ``W``, row-wise absmax-quantized.
        weight_absmax: ``(O,)`` float32 absmax of each row of ``W``.
        threshold: ``alpha``; a column with any ``|x| >= alpha`` is an outlier column.
        fp16_dims: ``(D,)`` distinct input dimensions whose original 16-bit weight columns are given.
        fp16_columns: ``(O, D)`` those columns, ``W[:, fp16_dims]``.
        bias: ``(O,)`` or ``None``.
        outliers: ``"dynamic"`` (every column checked) or ``"calibrated"`` (only ``fp16_dims``).
        kept_slot: ``(H,)`` :func:`kept_slots` of ``fp16_dims`` (the fused path; built if not given).
    """
    lead, h = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, h)  # (S, H)
    o = weight_int8.shape[0]
    if FUSED and (x.is_cuda or TRITON_ON_CPU) and x.dtype in FUSED_DTYPES:
        from models import int8_triton

        dims = fp16_dims if fp16_dims is not None else torch.zeros(0, dtype=torch.long, device=x.device)
        cols = fp16_columns if fp16_dims is not None else x.new_zeros(o, 0)
        slot = kept_slot if kept_slot is not None else kept_slots(dims, h)
        out = int8_triton.int8_linear(x2, weight_int8, weight_absmax, slot, dims, cols, bias, threshold,
                                      outliers == "calibrated", GEMM)
        return out.reshape(*lead, o)
    return _decomposed_reference(x2, weight_int8, weight_absmax, threshold, fp16_dims, fp16_columns, bias,
                                 outliers).reshape(*lead, o)


def _decomposed_reference(x2: torch.Tensor, weight_int8: torch.Tensor, weight_absmax: torch.Tensor,
                          threshold: float, fp16_dims: torch.Tensor | None, fp16_columns: torch.Tensor | None,
                          bias: torch.Tensor | None, outliers: str) -> torch.Tensor:
    """The plain PyTorch ops of :func:`int8_matmul_decomposed` on ``(S, H)`` activations."""
    x = x2
    h = x2.shape[1]
    w_scale = weight_absmax.float() / (Q * Q)  # (O,)
    has_kept = fp16_dims is not None and fp16_dims.numel() > 0
    idx = hit = taken = None
    if not math.isinf(threshold) and x2.shape[0] > 0 and (outliers == "dynamic" or has_kept):
        if outliers == "dynamic":
            colmax = torch.linalg.vector_norm(x2.detach(), ord=math.inf, dim=0)  # (H,) max |x| per column
            idx = torch.nonzero(colmax >= threshold).squeeze(1)  # (K,): a host sync, eager only
            if idx.numel() == 0:
                idx = None
        else:
            idx = fp16_dims  # (D,) fixed
            x_k = x2.index_select(1, idx)  # (S, D)
            hit = torch.linalg.vector_norm(x_k.detach(), ord=math.inf, dim=0) >= threshold  # (D,)
        if idx is not None:  # the columns handled in 16-bit are zeroed in the int8 part
            mark = torch.ones_like(idx, dtype=torch.bool) if hit is None else hit
            taken = torch.zeros(h, dtype=torch.bool, device=x.device).scatter(0, idx, mark)
    q, cx = absmax_quantize(x2 if taken is None else x2.masked_fill(taken, 0))  # (S, H), (S,)
    acc = int8_mm(q, weight_int8)  # (S, O) int32
    y16 = None
    if hit is not None:  # calibrated: the kept columns that are outliers in this call
        y16 = (x_k * hit.to(x_k.dtype)) @ fp16_columns.to(x.dtype).t()  # (S, O)
    elif idx is not None:  # dynamic: 16-bit weight columns where kept, else the dequantized int8 column
        x_o = x2[:, idx]  # (S, K) 16-bit
        w_o = weight_int8[:, idx].to(x.dtype) * (weight_absmax.float() / Q).to(x.dtype)[:, None]  # (O, K)
        if has_kept:
            slot = torch.full((h,), -1, dtype=torch.long, device=x.device)
            slot[fp16_dims] = torch.arange(fp16_dims.numel(), device=x.device)
            s = slot[idx]  # (K,)
            kept = fp16_columns[:, s.clamp(min=0)].to(x.dtype)  # (O, K)
            w_o = torch.where((s >= 0)[None, :], kept, w_o)
        y16 = x_o @ w_o.t()  # (S, O) in the activations' dtype
    y = acc.float() * (cx[:, None] * w_scale[None, :])  # (S, O) float32
    if y16 is not None:
        y = y + y16.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot become an :class:`Int8Linear`, or ``None`` if it can."""
    if isinstance(module, Int8Linear):
        return "is already an Int8Linear"
    if isinstance(module, Int8LinearSlice):
        return "is already an Int8Linear (a slice of a fused one)"
    if not isinstance(module, nn.Linear):
        return (f"is a {type(module).__name__}, not an nn.Linear; only nn.Linear layers are "
                f"converted (exclude it, or narrow include)")
    w = module.weight
    if type(w.data) is not torch.Tensor or w.layout != torch.strided:
        return (f"has a {type(w.data).__name__} weight (a 2:4-exported or otherwise packed layer); "
                f"quantize the dense N:M-pruned weights before export_sparse_24, not after")
    if not w.dtype.is_floating_point:
        return f"has a {w.dtype} weight; needs a floating-point weight"
    if w.ndim != 2:
        return f"has a weight of shape {tuple(w.shape)}; needs (out, in)"
    return None


def _refresh_after_load(module: Int8Linear, incompatible_keys: object) -> None:
    module.refresh()  # a module-level function, so that a pickled model keeps its hook


class Int8Linear(nn.Module):
    """An ``nn.Linear`` computed with LLM.int8() (see the module docstring).

    Buffers (the state dict): ``weight_int8`` ``(O, H)`` int8, ``weight_absmax`` ``(O,)``
    float32, ``fp16_dims`` ``(D,)`` int64 and ``fp16_columns`` ``(O, D)`` in the original dtype,
    and ``bias``; not saved: ``kept_slot`` ``(H,)`` int32 (:func:`kept_slots` of ``fp16_dims``,
    rebuilt by :meth:`from_linear`, ``load_state_dict`` and :meth:`refresh`). Build one with
    :meth:`from_linear`. On CUDA the forward is the fused Triton path (module docstring).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        threshold: outlier threshold ``alpha`` (> 0; ``inf`` = plain row-wise int8).
        num_fp16_dims: how many 16-bit weight columns are kept (``D``).
        outliers: ``"dynamic"`` (every column checked per call; the paper) or ``"calibrated"``
            (only the kept columns; fixed shapes for CUDA graphs), see the module docstring.
        dtype: dtype of the 16-bit columns and of the bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 num_fp16_dims: int = 0, outliers: Literal["dynamic", "calibrated"] = "dynamic",
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.threshold = check_threshold(threshold)
        if outliers not in OUTLIER_MODES:
            raise ValueError(f"outliers: expected 'dynamic' or 'calibrated', got {outliers!r}")
        if not 0 <= num_fp16_dims <= in_features:
            raise ValueError(f"num_fp16_dims: must be in [0, {in_features}], got {num_fp16_dims!r}")
        self.in_features, self.out_features, self.outliers = in_features, out_features, outliers
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("fp16_dims", torch.zeros(num_fp16_dims, dtype=torch.long, device=device))
        self.register_buffer("fp16_columns", torch.zeros(out_features, num_fp16_dims, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("kept_slot", torch.full((in_features,), -1, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def refresh(self) -> None:
        """Rebuild ``kept_slot`` from ``fp16_dims`` (after changing the buffers by hand)."""
        self.kept_slot = kept_slots(self.fp16_dims, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0,
                    fp16_dims: Sequence[int] | torch.Tensor = (),
                    outliers: Literal["dynamic", "calibrated"] = "dynamic") -> Int8Linear:
        """Quantize ``linear``'s weight per output row (absmax) once; keep ``fp16_dims`` columns."""
        why = int8_refusal(linear)
        if why is not None:
            raise ValueError(f"linear: a {type(linear).__name__} that {why}")
        w = linear.weight.detach()
        dims = torch.as_tensor(fp16_dims, dtype=torch.long).flatten().unique().to(w.device)
        if dims.numel() and (int(dims.min()) < 0 or int(dims.max()) >= linear.in_features):
            raise ValueError(f"fp16_dims: input dimensions must be in [0, {linear.in_features}), got "
                             f"{dims.tolist()!r}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                    dims.numel(), outliers, dtype=w.dtype, device=w.device)
        q, c = absmax_quantize(w)
        layer.weight_int8.copy_(q)
        layer.weight_absmax.copy_(c)
        layer.fp16_dims.copy_(dims)
        layer.fp16_columns.copy_(w[:, dims])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        layer.refresh()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """``(O, H)`` float32 weight the int8 codes stand for (kept 16-bit columns exact)."""
        w = self.weight_int8.float() * (self.weight_absmax / Q)[:, None]
        w[:, self.fp16_dims] = self.fp16_columns.float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul_decomposed(x, self.weight_int8, self.weight_absmax, self.threshold,
                                      self.fp16_dims, self.fp16_columns, self.bias, self.outliers, self.kept_slot)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, "
                f"fp16_dims={self.fp16_dims.numel()}, outliers={self.outliers!r}")


def _version(x: torch.Tensor) -> int | None:
    # Inference tensors have no version counter; compiled code is traced once, not re-checked.
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class Int8LinearGroup:
    """Several Linear layers that read the same input, computed as ONE :class:`Int8Linear`.

    The fused layer's output rows are the layers' weights stacked (``sizes`` each). A call of
    part ``p`` with input ``x`` computes every part, returns part ``p`` and keeps the others for
    the next calls with the same ``x`` (the same tensor object, unmodified): BERT's query, key
    and value then cost one quantization and one GEMM. A call with another input, or a second
    call of a part, recomputes, so the result never depends on the call order.
    """

    def __init__(self, fused: Int8Linear, sizes: Sequence[int]) -> None:
        if sum(sizes) != fused.out_features:
            raise ValueError(f"sizes: must add up to the fused layer's {fused.out_features} outputs, got {sizes!r}")
        self.fused, self.sizes = fused, tuple(int(n) for n in sizes)
        self._kept: tuple | None = None  # (input, its version, {part: output})

    def output(self, x: torch.Tensor, part: int) -> torch.Tensor:
        kept = self._kept
        if kept is not None and kept[0] is x and part in kept[2] and kept[1] == _version(x):
            y = kept[2].pop(part)
            if not kept[2]:
                self._kept = None
            return y
        parts = self.fused(x).split(self.sizes, dim=-1)
        rest = {i: p for i, p in enumerate(parts) if i != part}
        self._kept = (x, _version(x), rest) if rest else None
        return parts[part]


class Int8LinearSlice(nn.Module):
    """Part ``part`` of an :class:`Int8LinearGroup`, in place of one of the fused layers.

    Part 0 holds the fused :class:`Int8Linear` as its submodule ``fused`` (state dict, ``.to()``);
    the other parts refer to it without registering it, so it is saved and counted once.
    """

    def __init__(self, group: Int8LinearGroup, part: int) -> None:
        super().__init__()
        if not 0 <= part < len(group.sizes):
            raise ValueError(f"part: must be in [0, {len(group.sizes)}), got {part!r}")
        self._group, self.part = group, part
        if part == 0:
            self.fused = group.fused

    @property
    def layer(self) -> Int8Linear:
        """The fused layer this slice reads."""
        return self._group.fused

    @property
    def in_features(self) -> int:
        return self._group.fused.in_features

    @property
    def out_features(self) -> int:
        return self._group.sizes[self.part]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(x, self.part)

    def extra_repr(self) -> str:
        return f"part={self.part} of {len(self._group.sizes)}, out_features={self.out_features}"


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and persistent buffers (what its state dict holds)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


@dataclass
class Int8Report:
    """What :func:`quantize_model` did: converted layer names (the original ones, fused or
    not), skipped ones with the reason, the bytes of the converted layers before and after, and
    the groups of names fused into one layer."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    fused: list[list[str]] = field(default_factory=list)  # names computed as one Int8Linear

    def __str__(self) -> str:
        lines = [f"int8: converted {len(self.converted)} Linear layers, {self.bytes_before / 2**20:.2f} MiB "
                 f"-> {self.bytes_after / 2**20:.2f} MiB"
                 + (f" (query/key/value fused in {len(self.fused)} attention blocks)" if self.fused else "")]
        lines += [f"int8: skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def quantize_model(model: nn.Module, threshold: float = 6.0, include: Iterable[str] = (DEFAULT_INCLUDE,),
                   exclude: Iterable[str] = (), fp16_dims: dict[str, Sequence[int] | torch.Tensor] | None = None,
                   outliers: Literal["dynamic", "calibrated"] = "dynamic", fuse_qkv: bool = True) -> Int8Report:
    """Replace the selected ``nn.Linear`` layers of ``model`` by :class:`Int8Linear`, in place.

    Selection: leaf modules whose name (``model.named_modules()``) matches an ``include`` regex
    (``re.search``) and no ``exclude`` one. Every selected ``nn.Linear`` is checked first and
    nothing is converted when one refuses (:func:`int8_refusal`: 2:4-exported weights,
    non-float weights): a ``ValueError`` lists them. Selected modules that are not
    ``nn.Linear`` but hold a matrix weight (embeddings, convolutions, transformers'
    ``Conv1D``) are not converted and are listed in the report's ``skipped`` with the reason.

    Args:
        fp16_dims: per layer name, the input dimensions whose 16-bit weight columns are kept
            (e.g. ``OutlierCounter.outlier_dims()`` on calibration data); default none.
        outliers: ``"dynamic"`` or ``"calibrated"`` for every converted layer (see the module
            docstring).
        fuse_qkv: when ``query``, ``key`` and ``value`` of a ``*SelfAttention`` module are all
            selected (same input width, dtype, device), convert them into one fused
            :class:`Int8Linear` (union of their ``fp16_dims``) and put an
            :class:`Int8LinearSlice` under each name; the report still lists the three names.
    """
    threshold = check_threshold(threshold)
    inc, exc = [re.compile(p) for p in include], [re.compile(p) for p in exclude]
    if not inc:
        raise ValueError("include: need at least one regex selecting layers, e.g. 'encoder\\.layer'")
    report = Int8Report()
    chosen, refusals = {}, {}
    for name, module in model.named_modules():
        if not name or list(module.children()) or not any(p.search(name) for p in inc) \
                or any(p.search(name) for p in exc):
            continue
        why = int8_refusal(module)
        if why is None:
            chosen[name] = module
        elif isinstance(module, (nn.Linear, Int8Linear, Int8LinearSlice)):
            if not isinstance(module, nn.Linear):
                report.skipped[name] = why
            else:
                refusals[name] = why
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim >= 2:
            report.skipped[name] = why
    if refusals:
        raise ValueError("quantize_model: these layers cannot be converted (nothing was): "
                         + "; ".join(f"{n} {w}" for n, w in refusals.items()))
    if not chosen and not report.skipped:
        raise ValueError(f"include: no nn.Linear matches {list(include)!r} (minus {list(exclude)!r})")
    dims = fp16_dims or {}
    unknown = sorted(set(dims) - set(chosen))
    if unknown:
        raise ValueError(f"fp16_dims: names that are not converted layers: {unknown[:5]!r}")
    groups = {names[0]: names for names in _qkv_groups(model, chosen)} if fuse_qkv else {}
    grouped = {name for names in groups.values() for name in names}
    for name, linear in chosen.items():
        if name in groups:
            _convert_group(model, [chosen[n] for n in groups[name]], groups[name], threshold, dims, outliers, report)
        elif name not in grouped:
            layer = Int8Linear.from_linear(linear, threshold, dims.get(name, ()), outliers)
            report.bytes_before += weight_bytes(linear)
            report.bytes_after += weight_bytes(layer)
            model.set_submodule(name, layer)
            report.converted.append(name)
    return report


def _qkv_groups(model: nn.Module, chosen: dict[str, nn.Linear]) -> list[list[str]]:
    """``[query, key, value]`` names of each ``*SelfAttention`` module whose three are chosen."""
    groups = []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("SelfAttention"):
            continue
        names = [f"{name}.{part}" if name else part for part in ("query", "key", "value")]
        if not all(n in chosen for n in names):
            continue
        first = chosen[names[0]].weight
        if all(chosen[n].in_features == first.shape[1] and chosen[n].weight.dtype == first.dtype
               and chosen[n].weight.device == first.device for n in names):
            groups.append(names)
    return groups


def _convert_group(model: nn.Module, linears: list[nn.Linear], names: list[str], threshold: float,
                   dims: dict, outliers: str, report: Int8Report) -> None:
    """One Int8Linear for ``linears`` (stacked output rows), a slice of it under each name."""
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum O, H)
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if any(lin.bias is not None for lin in linears):
        stacked.bias = nn.Parameter(torch.cat([lin.bias.detach() if lin.bias is not None else
                                               weight.new_zeros(lin.out_features) for lin in linears]),
                                    requires_grad=False)
    union = sorted({int(d) for n in names for d in torch.as_tensor(dims.get(n, ()), dtype=torch.long).flatten()})
    layer = Int8Linear.from_linear(stacked, threshold, union, outliers)
    group = Int8LinearGroup(layer, [lin.out_features for lin in linears])
    for part, (name, linear) in enumerate(zip(names, linears)):
        report.bytes_before += weight_bytes(linear)
        model.set_submodule(name, Int8LinearSlice(group, part))
        report.converted.append(name)
    report.bytes_after += weight_bytes(layer)
    report.fused.append(list(names))


class OutlierCounter:
    """Per-layer statistics of the inputs of ``nn.Linear`` layers, in bounded memory.

    Forward pre-hooks add, for each input dimension, the number of token positions where
    ``|x| >= threshold`` and the running max of ``|x|``; memory is ``O(layers x H)`` whatever
    the amount of data. Positions can be restricted with :meth:`set_mask` (e.g. the attention
    mask, so padding is not counted) when the input's leading shape equals the mask's.

    Use as a context manager (``with OutlierCounter(layers, 6.0) as c: model(...)``) or with
    :meth:`attach` / :meth:`detach`.
    """

    def __init__(self, layers: dict[str, nn.Module], threshold: float = 6.0) -> None:
        if not layers:
            raise ValueError("layers: need at least one layer to hook")
        self.threshold = check_threshold(threshold)
        self.layers = dict(layers)
        self.counts: dict[str, torch.Tensor] = {}  # (H,) int64
        self.absmax: dict[str, torch.Tensor] = {}  # (H,) float32
        self.tokens: dict[str, int] = {name: 0 for name in self.layers}
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        self.paused = False  # hooks stay attached but count nothing (forwards of other callers)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Count only positions where ``mask`` is true (inputs whose leading shape matches)."""
        self._mask = None if mask is None else mask.bool()

    def attach(self) -> OutlierCounter:
        if not self._handles:
            self._handles = [layer.register_forward_pre_hook(self._hook(name))
                             for name, layer in self.layers.items()]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> OutlierCounter:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.paused:
                return
            x = args[0].detach()
            if self._mask is not None and tuple(x.shape[:-1]) == tuple(self._mask.shape):
                x = x[self._mask.to(x.device)]  # (tokens, H)
            x = x.reshape(-1, x.shape[-1]).abs()
            count = (x >= self.threshold).sum(dim=0)
            peak = x.amax(dim=0).float() if x.shape[0] else torch.zeros(x.shape[-1], device=x.device)
            if name in self.counts:
                self.counts[name] += count
                torch.maximum(self.absmax[name], peak, out=self.absmax[name])
            else:
                self.counts[name], self.absmax[name] = count, peak
            self.tokens[name] += x.shape[0]
        return hook

    def fractions(self) -> dict[str, torch.Tensor]:
        """Per layer ``(H,)``: fraction of the counted positions with ``|x| >= threshold``."""
        return {n: self.counts[n].double().cpu() / max(self.tokens[n], 1) for n in self.counts}

    def outlier_dims(self, min_fraction: float = 0.0) -> dict[str, torch.Tensor]:
        """Per layer, the dimensions that reached the threshold in more than ``min_fraction``
        of the positions (default: at least once)."""
        return {n: torch.nonzero(f > min_fraction).squeeze(1) for n, f in self.fractions().items()}
