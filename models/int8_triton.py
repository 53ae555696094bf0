"""Fused CUDA kernels (Triton) for the int8 part of LLM.int8() (see :mod:`models.int8`).

Written in plain PyTorch, quantizing the activations takes about seven passes over ``x``
(zero the outlier columns, abs, row max, divide, round, clamp, cast) and dequantizing the int32
product three more (two scale products, bias); each pass is a kernel launch and a round trip
through memory, which on an H200 costs more than the int8 GEMM saves at BERT sizes. Here:

* :func:`quantize_rows`: one program per row reads it twice (row absmax over the non-outlier
  columns, then the codes) and writes the int8 codes and the float32 scale;
* :func:`dequantize`: one pass over the int32 product computes
  ``acc * c_x c_w / 127^2 (+ 16-bit outlier product) (+ bias)`` in float32 and writes the
  output dtype.

Both give the same numbers as the PyTorch path (round half to even, as ``torch.round``).
Imported lazily by :mod:`models.int8` on CUDA tensors only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    # torch.round's rule, exactly: v - floor(v) is exact in float32 for |v| < 2^23.
    f = tl.floor(v)
    frac = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _quantize_rows_kernel(X, TAKEN, Q, CX, H, stride_x, BLOCK: tl.constexpr, HAS_TAKEN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < H
        x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_TAKEN:
            taken = tl.load(TAKEN + cols, mask=inside, other=0)
            x = tl.where(taken != 0, 0.0, x)
        amax = tl.maximum(amax, tl.abs(x))
    c = tl.max(amax, axis=0)
    inv = tl.where(c > 0, 127.0 / c, 0.0)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < H
        x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_TAKEN:
            taken = tl.load(TAKEN + cols, mask=inside, other=0)
            x = tl.where(taken != 0, 0.0, x)
        q = tl.minimum(tl.maximum(_round_half_even(x * inv), -127.0), 127.0)
        tl.store(Q + row * H + cols, q.to(tl.int8), mask=inside)
    tl.store(CX + row, c)


def quantize_rows(x: torch.Tensor, taken: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``absmax_quantize(x.masked_fill(taken, 0))`` in one kernel: ``x`` ``(S, H)`` with unit
    column stride, ``taken`` ``(H,)`` bool or ``None``. Returns int8 ``(S, H)``, float32 ``(S,)``."""
    s, h = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((s, h), dtype=torch.int8, device=x.device)
    cx = torch.empty(s, dtype=torch.float32, device=x.device)
    if s == 0:
        return q, cx
    block = min(triton.next_power_of_2(h), 2048)
    _quantize_rows_kernel[(s,)](x, taken if taken is not None else x, q, cx, h, x.stride(0),
                                BLOCK=block, HAS_TAKEN=taken is not None, num_warps=4 if block <= 1024 else 8)
    return q, cx


@triton.jit
def _dequantize_kernel(ACC, CX, WS, Y16, BIAS, OUT, S, O, stride_acc, stride_y16,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Y16: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rin, cin = rows < S, cols < O
    inside = rin[:, None] & cin[None, :]
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.load(ACC + r64 * stride_acc + cols[None, :], mask=inside, other=0).to(tl.float32)
    cx = tl.load(CX + rows, mask=rin, other=0.0)
    ws = tl.load(WS + cols, mask=cin, other=0.0)
    y = acc * (cx[:, None] * ws[None, :])
    if HAS_Y16:
        y += tl.load(Y16 + r64 * stride_y16 + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=cin, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + r64 * O + cols[None, :], y.to(OUT.dtype.element_ty), mask=inside)


def dequantize(acc: torch.Tensor, cx: torch.Tensor, w_scale: torch.Tensor, y16: torch.Tensor | None,
               bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``(acc * cx[:, None] * w_scale[None, :] + y16 + bias).to(dtype)`` in one pass.

    ``acc`` int32 ``(S, O)`` (row stride free), ``cx`` ``(S,)`` and ``w_scale`` ``(O,)`` float32
    (``w_scale`` already divided by 127^2), ``y16`` ``(S, O)`` or ``None``, ``bias`` ``(O,)`` or ``None``.
    """
    s, o = acc.shape
    out = torch.empty((s, o), dtype=dtype, device=acc.device)
    if s == 0:
        return out
    if y16 is not None and y16.stride(1) != 1:
        y16 = y16.contiguous()
    bm, bn = 32, 128
    grid = (triton.cdiv(s, bm), triton.cdiv(o, bn))
    _dequantize_kernel[grid](acc, cx, w_scale, y16 if y16 is not None else acc,
                             bias if bias is not None else cx, out, s, o, acc.stride(0),
                             y16.stride(0) if y16 is not None else 0, BLOCK_M=bm, BLOCK_N=bn,
                             HAS_Y16=y16 is not None, HAS_BIAS=bias is not None, num_warps=4)
    return out
