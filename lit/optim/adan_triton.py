"""Fused Adan step on CUDA: one Triton launch updates every tensor of a param group.

Adan (Xie et al., arXiv 2208.06677) reads p, g, g_prev, m, v, n and writes p, m, v, n, g_prev:
11 x 4 bytes per fp32 parameter, so a step is bound by memory bandwidth. A chain of
``torch._foreach_*`` ops reads and writes each state tensor several times; this kernel touches
each exactly once, in registers, for all tensors of a group in a single launch (the
``multi_tensor_apply`` idea of apex, done with a pointer table): program ``i`` finds its tensor
and offset in two small int arrays, loads the tensor's six base addresses from the table and
updates ``BLOCK`` elements.

Imported lazily by :mod:`lit.optim.adan` (Triton is only needed for the fused path). With
``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (slowly), which the tests use.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Measured on one H200 (100M params): 1024/4 1.06 ms, 2048/8 1.10 ms, 4096/8 1.20 ms.
BLOCK = 1024
NUM_WARPS = 4
# A pointer-table row: six base addresses (p, g, exp_avg m, exp_avg_sq n, exp_avg_diff v,
# neg_pre_grad) and the size.
ROW = 7


@triton.jit
def _adan_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, n_ptrs, q_ptrs, mask, clip_ptr,
                beta1, beta2, beta3, step_size, step_size_diff, bias_correction3_sqrt, eps,
                decay_mul, decay_div, HAS_CLIP: tl.constexpr, MASKED: tl.constexpr):
    # The tail block of a tensor is masked; full blocks are not, so that their loads and
    # stores compile to 128-bit vector instructions (a mask on an unknown size blocks that).
    if MASKED:
        p = tl.load(p_ptrs, mask=mask)
        g = tl.load(g_ptrs, mask=mask)
        m = tl.load(m_ptrs, mask=mask)
        v = tl.load(v_ptrs, mask=mask)
        n = tl.load(n_ptrs, mask=mask)
        neg_prev = tl.load(q_ptrs, mask=mask)
    else:
        p = tl.load(p_ptrs)
        g = tl.load(g_ptrs)
        m = tl.load(m_ptrs)
        v = tl.load(v_ptrs)
        n = tl.load(n_ptrs)
        neg_prev = tl.load(q_ptrs)
    out_ty = p.dtype
    p = p.to(tl.float32)
    g = g.to(tl.float32)
    m = m.to(tl.float32)
    v = v.to(tl.float32)
    n = n.to(tl.float32)
    neg_prev = neg_prev.to(tl.float32)
    if HAS_CLIP:
        g = g * tl.load(clip_ptr)

    diff = g + neg_prev                                  # g_t - g_{t-1}
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * diff
    w = g + beta2 * diff
    n = beta3 * n + (1.0 - beta3) * (w * w)
    # Round-to-nearest sqrt/div (Triton's defaults are approximate) so that this path agrees
    # with the torch paths to float32 rounding; the kernel stays bandwidth-bound either way.
    den = tl.div_rn(tl.sqrt_rn(n), bias_correction3_sqrt) + eps
    update = tl.div_rn(step_size * m + step_size_diff * v, den)
    p = tl.div_rn(p * decay_mul - update, decay_div)

    if MASKED:
        tl.store(p_ptrs, p.to(out_ty), mask=mask)
        tl.store(m_ptrs, m.to(out_ty), mask=mask)
        tl.store(v_ptrs, v.to(out_ty), mask=mask)
        tl.store(n_ptrs, n.to(out_ty), mask=mask)
        tl.store(q_ptrs, (-g).to(out_ty), mask=mask)
    else:
        tl.store(p_ptrs, p.to(out_ty))
        tl.store(m_ptrs, m.to(out_ty))
        tl.store(v_ptrs, v.to(out_ty))
        tl.store(n_ptrs, n.to(out_ty))
        tl.store(q_ptrs, (-g).to(out_ty))


@triton.jit
def _hint(base, offs, BLOCK: tl.constexpr):
    # Base addresses are 16-byte aligned (checked on the host) and a block is contiguous.
    return tl.max_contiguous(tl.multiple_of(base + offs, 16), BLOCK)


@triton.jit
def _adan_kernel(table_ptr, block_tensor_ptr, block_start_ptr, clip_ptr, witness_ptr,
                 beta1, beta2, beta3, step_size, step_size_diff, bias_correction3_sqrt, eps,
                 decay_mul, decay_div,
                 HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 7  # ROW
    start = tl.load(block_start_ptr + pid)
    numel = tl.load(row + 6)
    # witness_ptr only carries the element type (fp32/fp16/bf16) for the int -> pointer casts.
    ptr_type = witness_ptr.dtype
    offs = start + tl.arange(0, BLOCK)
    p = _hint(tl.load(row + 0).to(ptr_type), offs, BLOCK)
    g = _hint(tl.load(row + 1).to(ptr_type), offs, BLOCK)
    m = _hint(tl.load(row + 2).to(ptr_type), offs, BLOCK)
    n = _hint(tl.load(row + 3).to(ptr_type), offs, BLOCK)
    v = _hint(tl.load(row + 4).to(ptr_type), offs, BLOCK)
    q = _hint(tl.load(row + 5).to(ptr_type), offs, BLOCK)
    mask = offs < numel
    if start + BLOCK <= numel:
        _adan_block(p, g, m, v, n, q, mask, clip_ptr, beta1, beta2, beta3, step_size,
                    step_size_diff, bias_correction3_sqrt, eps, decay_mul, decay_div,
                    HAS_CLIP, False)
    else:
        _adan_block(p, g, m, v, n, q, mask, clip_ptr, beta1, beta2, beta3, step_size,
                    step_size_diff, bias_correction3_sqrt, eps, decay_mul, decay_div,
                    HAS_CLIP, True)


class FusedPlan:
    """The launch data for one list of tensor sets: a block map (program -> tensor, offset),
    fixed by the tensor sizes, and a pointer table (six base addresses and the size per
    tensor), rebuilt only when an address changes (params and state never move; grads
    usually get the same memory back from the caching allocator at every step).
    """

    def __init__(self, numels: tuple[int, ...], device: torch.device) -> None:
        self.numels = numels
        self.device = device
        sizes = torch.tensor(numels, dtype=torch.int64)
        counts = (sizes + BLOCK - 1) // BLOCK
        self.n_blocks = int(counts.sum())
        block_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_block = torch.cumsum(counts, 0) - counts
        block_start = (torch.arange(self.n_blocks) - first_block[block_tensor]) * BLOCK
        self.block_tensor = _to_device(block_tensor.to(torch.int32), device)
        self.block_start = _to_device(block_start, device)
        self.addresses: tuple[int, ...] = ()
        self.table = torch.empty(0)

    def update_table(self, tensors: list[list[torch.Tensor]]) -> torch.Tensor:
        """The device pointer table for ``tensors`` (six lists: p, g, m, n, v, neg_pre_grad)."""
        addresses = tuple(t.data_ptr() for ts in tensors for t in ts)
        if addresses != self.addresses:
            n = len(self.numels)
            rows = torch.empty(n, ROW, dtype=torch.int64)
            rows[:, :6] = torch.tensor(addresses, dtype=torch.int64).view(6, n).T
            rows[:, 6] = torch.tensor(self.numels, dtype=torch.int64)
            self.table = _to_device(rows.flatten(), self.device)
            self.addresses = addresses
        return self.table


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":  # CPU tensors: Triton's interpreter (TRITON_INTERPRET=1)
        return t.to(device)
    # Pinned + non_blocking: the copy is queued on the stream without a host sync.
    return t.pin_memory().to(device, non_blocking=True)


def fusable(tensors: tuple[torch.Tensor, ...]) -> bool:
    """True when the kernel can treat (p, g, m, v, n, neg_pre_grad) as flat aligned arrays."""
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.float16, torch.bfloat16)
            and all(t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 16 == 0
                    for t in tensors))


def adan_fused(plan: FusedPlan, tensors: list[list[torch.Tensor]], *, beta1: float, beta2: float,
               beta3: float, lr: float, eps: float, weight_decay: float, no_prox: bool,
               step: int, clip: torch.Tensor | None) -> None:
    """One Adan step over ``tensors`` (six lists: p, g, exp_avg, exp_avg_sq, exp_avg_diff,
    neg_pre_grad; one dtype on one device, contiguous, 16-byte aligned: see :func:`fusable`),
    in one launch.
    Equations as :func:`lit.optim.adan.adan_single_tensor`; ``clip`` is the global-norm scale
    (a 0-dim device tensor) or None."""
    step_size = lr / (1.0 - beta1 ** step)
    step_size_diff = lr * beta2 / (1.0 - beta2 ** step)
    bias_correction3_sqrt = (1.0 - beta3 ** step) ** 0.5
    # no_prox: p = p (1 - lr wd) - update; otherwise p = (p - update) / (1 + lr wd).
    if no_prox:
        decay_mul, decay_div = 1.0 - lr * weight_decay, 1.0
    else:
        decay_mul, decay_div = 1.0, 1.0 + lr * weight_decay
    witness = tensors[0][0]
    table = plan.update_table(tensors)
    clip_arg = clip if clip is not None else witness
    on_device = torch.cuda.device(witness.device) if witness.is_cuda else contextlib.nullcontext()
    with on_device:
        _adan_kernel[(plan.n_blocks,)](
            table, plan.block_tensor, plan.block_start, clip_arg, witness,
            beta1, beta2, beta3, step_size, step_size_diff, bias_correction3_sqrt, eps,
            decay_mul, decay_div,
            HAS_CLIP=clip is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
