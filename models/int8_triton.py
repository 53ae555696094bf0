"""Fused CUDA kernels (Triton) for LLM.int8(): the fast path of :class:`models.int8.Int8Linear`.

One Linear call ``Y = X W^T + b`` (``X`` ``(S, H)`` 16-bit, ``W`` stored as int8 codes ``(O, H)``
with float scales ``c_w``) is three kernels and one fill, none of which reports anything to the
host (no ``nonzero``, no ``.item()``, no data-dependent shape), so a captured CUDA graph or a
compiled graph stays exact when the set of outlier columns changes between calls:

1. a zero fill of a small int32 workspace (column maxima, outlier lists and their counts);
2. :func:`_colmax_kernel`: ``max_i |X_ij|`` per column with a 2-D grid and an atomic max into
   the workspace (non-negative floats compare like their int32 bit patterns). In
   ``calibrated`` mode only the kept columns ``fp16_dims`` are read (a gather);
3. :func:`_quantize_kernel`: program 0 compacts the outlier columns (``colmax >= alpha``) into
   two lists with ``tl.cumsum``: those with a kept 16-bit weight column (and its slot) and the
   others, plus both counts; every other program quantizes a block of rows: absmax over the
   non-outlier columns (float32 scale ``c_x``) and ``round(127 x / c_x)`` int8 codes, outlier
   columns zeroed;
4. :func:`_int8_gemm_kernel`: ``tl.dot`` int8 x int8 -> int32 over ``H`` (the stored ``(O, H)``
   weight is the K-major operand int8 tensor cores want), then in the epilogue, in float32
   registers: ``acc * c_x / 127``, plus the outlier columns without a kept weight
   (``X[:, j] @ codes[:, j]^T``: int8 codes are exact in 16-bit), times ``c_w / 127``, plus the
   outlier columns with a kept 16-bit weight (``X[:, j] @ W16[:, slot]^T``), plus the bias, cast
   to the output dtype. The outlier loops run over the lists in chunks of 16 (``tl.dot``) up
   to the count read from device memory: nothing is capped or dropped.

``gemm="int_mm"`` replaces step 4 by ``torch._int_mm`` (cuBLASLt) and :func:`_dequantize_kernel`
(the same epilogue over the int32 product); ``"auto"`` (the default) times both, and a few
Triton tile configurations, once per shape (``S`` rounded up to a power of two, ``O``, ``H``) and
keeps the fastest. The numbers do not depend on the choice: the int32 sums are exact and the
epilogue is the same code.

Rounding: codes are ``round_half_even(x * s)`` with ``s = fl(fl(1 / c_x) * 127)``, which is how
torch evaluates ``127 / c_x`` (an IEEE reciprocal, then the product), so the int8 codes equal
those of the PyTorch path on the CPU and on CUDA.

With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors
(tests; slow). Under ``torch.compile`` the whole call is one opaque custom op,
``torch.ops.lit_int8.linear``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# "0" skips the timing of GEMM variants and uses the shape heuristic (as during graph capture).
AUTOTUNE = os.environ.get("LIT_INT8_AUTOTUNE", "1") != "0"
GEMM_BACKENDS = ("auto", "triton", "int_mm")
# Triton GEMM tiles: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper: 128-row tiles,
# 128-256 columns, K 64-128, 3-5 stages; the 64-row tile for narrow outputs at 4k tokens.
GEMM_CONFIGS = (
    (128, 256, 128, 8, 3),
    (128, 128, 128, 4, 4),
    (128, 128, 128, 8, 4),
    (128, 256, 64, 8, 4),
    (64, 128, 128, 4, 4),
)
INT_MM = "int_mm"  # the cuBLASLt candidate of the tuner
_CHUNK = 16  # outlier columns per tl.dot in the epilogue


@triton.jit
def _round_half_even(v):
    # torch.round's rule, exactly: v - floor(v) is exact in float32 for |v| < 2^23.
    f = tl.floor(v)
    frac = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _inverse_scale(c, BLOCK_S: tl.constexpr):
    # 127 / c exactly as torch computes it (a float32 reciprocal, then times 127: torch.round of
    # the PyTorch path sees the same products); rows of zeros get 0.
    one = tl.full([BLOCK_S], 1.0, tl.float32)
    return tl.where(c > 0, tl.math.div_rn(one, tl.where(c > 0, c, 1.0)) * 127.0, 0.0)


@triton.jit(do_not_specialize=["S", "NCOLS"])
def _colmax_kernel(X, DIMS, WS, S, NCOLS, stride_x, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                   GATHER: tl.constexpr):
    """WS[j] = max(WS[j], max_i |X_ij|) as int32 bits; columns DIMS[c] when GATHER, else c."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = c < NCOLS
    if GATHER:
        cols = tl.load(DIMS + c, mask=cin, other=0).to(tl.int32)
    else:
        cols = c
    peak = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK_S, S, tl.num_programs(0) * BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        ptrs = X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
        x = tl.load(ptrs, mask=(rows < S)[:, None] & cin[None, :], other=0.0)
        peak = tl.maximum(peak, tl.max(tl.abs(x.to(tl.float32)), axis=0))
    tl.atomic_max(WS + cols, peak.to(tl.int32, bitcast=True), mask=cin)


@triton.jit
def _quantize_rows(X, WS, Q, CX, row0, S, H, stride_x, threshold, BLOCK_S: tl.constexpr,
                   BLOCK_H: tl.constexpr, OUTLIERS: tl.constexpr, ONE_PASS: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_S)
    rin = rows < S
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    q_rows = Q + rows.to(tl.int64)[:, None] * H
    if ONE_PASS:  # the whole row block in registers: X is read once
        cols = tl.arange(0, BLOCK_H)
        inside = rin[:, None] & (cols < H)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if OUTLIERS:
            peak = tl.load(WS + cols, mask=cols < H, other=0).to(tl.float32, bitcast=True)
            x = tl.where((peak >= threshold)[None, :], 0.0, x)
        c = tl.max(tl.abs(x), axis=1)
        inv = _inverse_scale(c, BLOCK_S)
        q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), -127.0), 127.0)
        tl.store(q_rows + cols[None, :], q.to(tl.int8), mask=inside)
    else:  # long rows: absmax pass, then codes pass (the second read mostly hits L2)
        amax = tl.zeros([BLOCK_S, BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            inside = rin[:, None] & (cols < H)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            if OUTLIERS:
                peak = tl.load(WS + cols, mask=cols < H, other=0).to(tl.float32, bitcast=True)
                x = tl.where((peak >= threshold)[None, :], 0.0, x)
            amax = tl.maximum(amax, tl.abs(x))
        c = tl.max(amax, axis=1)
        inv = _inverse_scale(c, BLOCK_S)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            inside = rin[:, None] & (cols < H)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            if OUTLIERS:
                peak = tl.load(WS + cols, mask=cols < H, other=0).to(tl.float32, bitcast=True)
                x = tl.where((peak >= threshold)[None, :], 0.0, x)
            q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), -127.0), 127.0)
            tl.store(q_rows + cols[None, :], q.to(tl.int8), mask=inside)
    tl.store(CX + rows, c, mask=rin)


@triton.jit
def _compact_outliers(WS, SLOT, H, threshold, BLOCK_L: tl.constexpr):
    """Lists after the H column maxima in WS: [n_kept, n_plain, kept cols (H), kept slots (H),
    plain cols (H)]; a column is an outlier when its max |x| >= threshold."""
    lists = WS + H
    n_kept = tl.sum(tl.zeros([BLOCK_L], dtype=tl.int32), axis=0)
    n_plain = n_kept
    for start in range(0, H, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        inside = cols < H
        peak = tl.load(WS + cols, mask=inside, other=0).to(tl.float32, bitcast=True)
        slot = tl.load(SLOT + cols, mask=inside, other=-1)
        hit = inside & (peak >= threshold)
        kept = (hit & (slot >= 0)).to(tl.int32)
        plain = (hit & (slot < 0)).to(tl.int32)
        at_kept = n_kept + tl.cumsum(kept, axis=0) - kept  # exclusive prefix sums: list positions
        at_plain = n_plain + tl.cumsum(plain, axis=0) - plain
        tl.store(lists + 2 + at_kept, cols, mask=kept != 0)
        tl.store(lists + 2 + H + at_kept, slot, mask=kept != 0)
        tl.store(lists + 2 + 2 * H + at_plain, cols, mask=plain != 0)
        n_kept += tl.sum(kept, axis=0)
        n_plain += tl.sum(plain, axis=0)
    tl.store(lists, n_kept)
    tl.store(lists + 1, n_plain)


@triton.jit(do_not_specialize=["S"])
def _quantize_kernel(X, WS, SLOT, Q, CX, S, H, stride_x, threshold, BLOCK_S: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, OUTLIERS: tl.constexpr,
                     ONE_PASS: tl.constexpr):
    """Program 0 compacts the outlier columns (when OUTLIERS); the others quantize row blocks."""
    pid = tl.program_id(0)
    if OUTLIERS:
        if pid == 0:
            _compact_outliers(WS, SLOT, H, threshold, BLOCK_L)
        else:
            _quantize_rows(X, WS, Q, CX, (pid - 1) * BLOCK_S, S, H, stride_x, threshold, BLOCK_S, BLOCK_H,
                           OUTLIERS, ONE_PASS)
    else:
        _quantize_rows(X, WS, Q, CX, pid * BLOCK_S, S, H, stride_x, threshold, BLOCK_S, BLOCK_H, OUTLIERS,
                       ONE_PASS)


@triton.jit
def _dot16(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 activations: no TF32 rounding of the outlier part
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _epilogue(acc, rm, rn, S, O, H, D, CX, CW, X, stride_x, W, FP16C, WS, BIAS,
              OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """float32 (BLOCK_M, BLOCK_N) output tile from the int32 tile ``acc`` (see module docstring)."""
    rin, nin = rm < S, rn < O
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    cx = tl.load(CX + rm, mask=rin, other=0.0)
    cw = tl.load(CW + rn, mask=nin, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * tl.math.div_rn(cx, tl.full(cx.shape, 127.0, tl.float32))[:, None]
    if OUTLIERS:  # outlier columns without a kept 16-bit weight: x times the int8 codes, then * c_w/127
        lists = WS + H
        n_plain = tl.load(lists + 1)
        for start in range(0, n_plain, 16):
            k = start + tl.arange(0, 16)
            valid = k < n_plain
            j = tl.load(lists + 2 + 2 * H + k, mask=valid, other=0)
            xa = tl.load(X + rm64[:, None] * stride_x + j[None, :], mask=rin[:, None] & valid[None, :], other=0.0)
            wb = tl.load(W + rn64[None, :] * H + j[:, None], mask=valid[:, None] & nin[None, :], other=0)
            y = _dot16(xa, wb.to(xa.dtype), y, IEEE)
    y = y * tl.math.div_rn(cw, tl.full(cw.shape, 127.0, tl.float32))[None, :]
    if OUTLIERS:  # outlier columns with a kept 16-bit weight column
        lists = WS + H
        n_kept = tl.load(lists)
        for start in range(0, n_kept, 16):
            k = start + tl.arange(0, 16)
            valid = k < n_kept
            j = tl.load(lists + 2 + k, mask=valid, other=0)
            slot = tl.load(lists + 2 + H + k, mask=valid, other=0)
            xa = tl.load(X + rm64[:, None] * stride_x + j[None, :], mask=rin[:, None] & valid[None, :], other=0.0)
            wb = tl.load(FP16C + rn64[None, :] * D + slot[:, None], mask=valid[:, None] & nin[None, :], other=0.0)
            y = _dot16(xa, wb.to(xa.dtype), y, IEEE)
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=nin, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit(do_not_specialize=["S", "D"])
def _int8_gemm_kernel(Q, W, CX, CW, X, FP16C, WS, BIAS, OUT, S, O, H, D, stride_x,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, OUTLIERS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """OUT (S, O) = epilogue(Q (S, H) int8 @ W (O, H)^T int8), one output tile per program."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(S, BLOCK_M), tl.cdiv(O, BLOCK_N)
    in_group = GROUP_M * num_n  # grouped order: neighbouring programs share A rows in L2
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read a valid row (results dropped at the store): no masks in the loop.
    a_ptrs = Q + (rm % S).to(tl.int64)[:, None] * H + rk[None, :]
    b_ptrs = W + (rn % O).to(tl.int64)[None, :] * H + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < H - k * BLOCK_K, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < H - k * BLOCK_K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    y = _epilogue(acc, rm, rn, S, O, H, D, CX, CW, X, stride_x, W, FP16C, WS, BIAS, OUTLIERS, HAS_BIAS, IEEE)
    out = OUT + rm.to(tl.int64)[:, None] * O + rn[None, :]
    tl.store(out, y.to(OUT.dtype.element_ty), mask=(rm < S)[:, None] & (rn < O)[None, :])


@triton.jit(do_not_specialize=["S", "D"])
def _dequantize_kernel(ACC, W, CX, CW, X, FP16C, WS, BIAS, OUT, S, O, H, D, stride_x, stride_acc,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OUTLIERS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """The GEMM kernel's epilogue over an int32 product ACC (S, O) from torch._int_mm."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rm < S)[:, None] & (rn < O)[None, :]
    acc = tl.load(ACC + rm.to(tl.int64)[:, None] * stride_acc + rn[None, :], mask=inside, other=0)
    y = _epilogue(acc, rm, rn, S, O, H, D, CX, CW, X, stride_x, W, FP16C, WS, BIAS, OUTLIERS, HAS_BIAS, IEEE)
    tl.store(OUT + rm.to(tl.int64)[:, None] * O + rn[None, :], y.to(OUT.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# Host side: launches, the per-shape choice of GEMM variant, the custom op.


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _launch_colmax(x: torch.Tensor, dims: torch.Tensor, ws: torch.Tensor, gather: bool) -> None:
    s, h = x.shape
    ncols = dims.numel() if gather else h
    block_c, block_s = (min(max(16, _pow2(ncols)), 64), 128) if gather else (128, 32)
    n_c = triton.cdiv(ncols, block_c)
    n_s = max(1, min(triton.cdiv(s, block_s), 8 * _sm_count(x.device) // n_c))  # ~8 programs per SM
    _colmax_kernel[(n_s, n_c)](x, dims if gather else ws, ws, s, ncols, x.stride(0),
                               BLOCK_S=block_s, BLOCK_C=block_c, GATHER=gather, num_warps=4)


def _launch_quantize(x, ws, slot, q, cx, threshold: float, outliers: bool) -> None:
    s, h = x.shape
    block_h = min(_pow2(h), 4096)
    block_s = max(1, 4096 // block_h)
    grid = (triton.cdiv(s, block_s) + (1 if outliers else 0),)
    _quantize_kernel[grid](x, ws, slot, q, cx, s, h, x.stride(0), threshold, BLOCK_S=block_s, BLOCK_H=block_h,
                           BLOCK_L=min(_pow2(h), 1024), OUTLIERS=outliers, ONE_PASS=block_h >= h,
                           num_warps=4 if block_s * block_h <= 2048 else 8,
                           # No fused multiply-add: with it the rounding's `v - floor(v)` used the
                           # unrounded product x * (127 / c), and codes within an ulp of .5 went the
                           # other way than torch.round of the rounded product (seen on one H200).
                           enable_fp_fusion=False)


def _launch_gemm(config, q, w, cx, cw, x, fp16c, ws, bias, out, d: int, outliers: bool, ieee: bool) -> None:
    s, h = q.shape
    o = w.shape[0]
    has_bias = bias is not None
    b = bias if has_bias else cx
    if config == INT_MM:
        acc = torch._int_mm(q, w.t())  # (S, O) int32; cuBLASLt's fast layout (A row-major, B column-major)
        bm, bn = 64, 128
        _dequantize_kernel[(triton.cdiv(s, bm), triton.cdiv(o, bn))](
            acc, w, cx, cw, x, fp16c, ws, b, out, s, o, h, d, x.stride(0), acc.stride(0), BLOCK_M=bm, BLOCK_N=bn,
            OUTLIERS=outliers, HAS_BIAS=has_bias, IEEE=ieee, num_warps=4)
        return
    bm, bn, bk, warps, stages = config
    if h % bk and h % 64 == 0:
        bk = 64  # an unmasked K loop: masked loads stop the software pipelining (and spill)
    grid = (triton.cdiv(s, bm) * triton.cdiv(o, bn),)
    _int8_gemm_kernel[grid](q, w, cx, cw, x, fp16c, ws, b, out, s, o, h, d, x.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                            BLOCK_K=bk, GROUP_M=8, EVEN_K=h % bk == 0, OUTLIERS=outliers, HAS_BIAS=has_bias,
                            IEEE=ieee, num_warps=warps, num_stages=stages)


def gemm_candidates(s: int, h: int, o: int, device: torch.device, gemm: str = "auto") -> list:
    """The GEMM variants ``gemm`` allows for this shape: Triton tile configs and/or ``"int_mm"``
    (``torch._int_mm`` on CUDA needs more than 16 rows and ``H``, ``O`` multiples of 8)."""
    if gemm not in GEMM_BACKENDS:
        raise ValueError(f"gemm: expected one of {GEMM_BACKENDS}, got {gemm!r}")
    int_mm_ok = device.type != "cuda" or (s > 16 and h % 8 == 0 and o % 8 == 0)
    triton_configs = list(GEMM_CONFIGS)
    if gemm == "triton" or not int_mm_ok:
        return triton_configs
    return [INT_MM] if gemm == "int_mm" else triton_configs + [INT_MM]


def _heuristic(candidates: list, s: int, o: int):
    """Untimed choice (graph capture, LIT_INT8_AUTOTUNE=0): the wide tile for large outputs."""
    if candidates == [INT_MM]:
        return INT_MM
    return GEMM_CONFIGS[0] if s * o >= 4096 * 4096 else GEMM_CONFIGS[1]


def _ms_per_call(run, reps: int = 10) -> float:
    run()  # compiles on first use
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


CHOSEN: dict[tuple, object] = {}  # tuning key -> chosen config (read by the benchmark)
FORCE_CONFIG = None  # a GEMM_CONFIGS entry or INT_MM: every call uses it, untimed (tests)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run_gemm(key: tuple, list_candidates, launch) -> None:
    """Launch the chosen variant for ``key``; time the candidates first when allowed."""
    config = FORCE_CONFIG if FORCE_CONFIG is not None else CHOSEN.get(key)
    if config is not None:
        launch(config)
        return
    candidates = list_candidates()
    device = key[-1]
    timed = AUTOTUNE and device.type == "cuda" and len(candidates) > 1 and not _capturing(device)
    if timed:
        best, best_ms, error = None, float("inf"), None
        for candidate in candidates:
            try:
                ms = _ms_per_call(lambda: launch(candidate))
            except Exception as err:  # a tile that does not compile or fit here: skip it
                error = err
                continue
            if ms < best_ms:
                best, best_ms = candidate, ms
        if best is None:
            raise RuntimeError(f"int8 GEMM: no variant runs for {key}") from error
        CHOSEN[key] = best
        launch(best)
        return
    first = _heuristic(candidates, key[0], key[1])
    order = [first] + [c for c in candidates if c != first]
    for i, candidate in enumerate(order):
        try:
            launch(candidate)
        except Exception:
            if i == len(order) - 1:
                raise
            continue
        if not _capturing(device):
            CHOSEN[key] = candidate
        return


def _int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_absmax: torch.Tensor, kept_slot: torch.Tensor,
                 fp16_dims: torch.Tensor, fp16_columns: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 calibrated: bool, gemm: str) -> torch.Tensor:
    s, h = x.shape
    o = weight_int8.shape[0]
    out = torch.empty((s, o), dtype=x.dtype, device=x.device)
    if s == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    d = fp16_dims.numel()
    outliers = threshold != float("inf") and (not calibrated or d > 0)
    q = torch.empty((s, h), dtype=torch.int8, device=x.device)
    cx = torch.empty(s, dtype=torch.float32, device=x.device)
    if outliers:  # [column max bits (H) | n_kept, n_plain | kept cols | kept slots | plain cols]
        ws = torch.zeros(4 * h + 2, dtype=torch.int32, device=x.device)
        _launch_colmax(x, fp16_dims, ws, calibrated)
    else:
        ws = cx  # not read
    _launch_quantize(x, ws, kept_slot, q, cx, threshold, outliers)
    fp16c = fp16_columns if d > 0 else x  # not read without kept columns (x: the same pointer type)
    ieee = x.dtype == torch.float32
    key = (_pow2(s), o, h, x.dtype, outliers, bias is not None, gemm, x.device)
    _run_gemm(key, lambda: gemm_candidates(s, h, o, x.device, gemm),
              lambda cfg: _launch_gemm(cfg, q, weight_int8, cx, weight_absmax, x, fp16c, ws, bias, out, d, outliers, ieee))
    return out


_SCHEMA = ("(Tensor x, Tensor weight_int8, Tensor weight_absmax, Tensor kept_slot, Tensor fp16_dims, "
           "Tensor fp16_columns, Tensor? bias, float threshold, bool calibrated, str gemm) -> Tensor")


@torch.library.custom_op("lit_int8::linear", mutates_args=(), schema=_SCHEMA)
def _linear_op(x, weight_int8, weight_absmax, kept_slot, fp16_dims, fp16_columns, bias, threshold, calibrated, gemm):
    return _int8_linear(x, weight_int8, weight_absmax, kept_slot, fp16_dims, fp16_columns, bias, threshold,
                        calibrated, gemm)


@_linear_op.register_fake
def _(x, weight_int8, weight_absmax, kept_slot, fp16_dims, fp16_columns, bias, threshold, calibrated, gemm):
    return x.new_empty((x.shape[0], weight_int8.shape[0]))


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_absmax: torch.Tensor, kept_slot: torch.Tensor,
                fp16_dims: torch.Tensor, fp16_columns: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                calibrated: bool, gemm: str = "auto") -> torch.Tensor:
    """The LLM.int8() product ``x @ W^T + bias`` in three kernels and a fill (module docstring).

    Args:
        x: ``(S, H)`` float16/bfloat16/float32 activations (unit column stride or copied).
        weight_int8, weight_absmax: ``(O, H)`` int8 codes and ``(O,)`` row absmax of ``W``.
        kept_slot: ``(H,)`` int32, the position of column ``j`` in ``fp16_dims`` or -1.
        fp16_dims, fp16_columns: ``(D,)`` kept input dimensions and ``(O, D)`` their 16-bit columns.
        bias: ``(O,)`` or ``None``.
        threshold: ``alpha`` (``inf``: plain int8, no outlier pass).
        calibrated: only ``fp16_dims`` can be outlier columns (``outliers="calibrated"``).
        gemm: ``"auto"`` (fastest of the Triton tiles and ``torch._int_mm``, timed per shape),
            ``"triton"`` or ``"int_mm"``.

    Returns:
        ``(S, O)`` in ``x``'s dtype. Under ``torch.compile`` one custom op; eagerly a direct call.
    """
    if torch.compiler.is_compiling():
        return torch.ops.lit_int8.linear(x, weight_int8, weight_absmax, kept_slot, fp16_dims, fp16_columns, bias,
                                         float(threshold), bool(calibrated), gemm)
    return _int8_linear(x, weight_int8, weight_absmax, kept_slot, fp16_dims, fp16_columns, bias, float(threshold),
                        bool(calibrated), gemm)
