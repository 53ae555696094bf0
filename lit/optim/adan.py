"""Adan: Adaptive Nesterov Momentum (Xie et al., arXiv 2208.06677).

The update follows the authors' reference code (sail-sg/Adan ``adan.py``), whose betas are
1 minus the paper's. Per parameter, step ``t`` from 1, ``g`` the (optionally globally clipped)
gradient and ``g_prev`` the previous one (``g_prev = g`` at ``t = 1``, so the first diff is 0)::

    diff = g - g_prev
    m    = b1 m + (1 - b1) g
    v    = b2 v + (1 - b2) diff
    n    = b3 n + (1 - b3) (g + b2 diff)^2
    den  = sqrt(n) / sqrt(1 - b3^t) + eps
    if no_prox: p *= 1 - lr wd
    p   -= lr / (1 - b1^t) m / den + lr b2 / (1 - b2^t) v / den
    if not no_prox: p /= 1 + lr wd

Three implementations of that step agree to float32 rounding: :func:`adan_single_tensor`
(the readable one), :func:`adan_foreach` (``torch._foreach_*``, the default on the CPU) and a
fused Triton kernel for CUDA (:mod:`lit.optim.adan_triton`, the default there).

This module imports only torch, so ``lit.cli`` can import it to make ``--optimizer Adan``
resolve by its short name.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable

import torch
from torch import Tensor

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")


def adan_single_tensor(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor],
                       neg_pre_grads: list[Tensor], *, beta1: float, beta2: float, beta3: float,
                       lr: float, eps: float, weight_decay: float, no_prox: bool, step: int,
                       clip: Tensor | None) -> None:
    """One Adan step, tensor by tensor, in place (see the module docstring).

    ``neg_pre_grads`` hold ``-g_prev`` (the reference's convention, which makes the diff an
    add); ``clip`` is the global-norm scale (a 0-dim tensor) or None. Grads are not modified.
    """
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    bias_correction3_sqrt = math.sqrt(1.0 - beta3 ** step)
    for p, g, m, n, v, neg_prev in zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs,
                                       neg_pre_grads):
        if clip is not None:
            g = g * clip
        diff = g + neg_prev                                   # g_t - g_{t-1}
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).add_(diff, alpha=1.0 - beta2)
        w = diff.mul_(beta2).add_(g)                          # g + b2 diff (reuses diff)
        n.mul_(beta3).addcmul_(w, w, value=1.0 - beta3)
        den = n.sqrt().div_(bias_correction3_sqrt).add_(eps)
        if no_prox:
            p.mul_(1.0 - lr * weight_decay)
        p.addcdiv_(m, den, value=-lr / bias_correction1)
        p.addcdiv_(v, den, value=-lr * beta2 / bias_correction2)
        if not no_prox:
            p.div_(1.0 + lr * weight_decay)
        neg_prev.copy_(g).neg_()


def adan_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor],
                 neg_pre_grads: list[Tensor], *, beta1: float, beta2: float, beta3: float,
                 lr: float, eps: float, weight_decay: float, no_prox: bool, step: int,
                 clip: Tensor | None) -> None:
    """:func:`adan_single_tensor` with ``torch._foreach_*`` ops over all tensors at once."""
    if not params:
        return
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    bias_correction3_sqrt = math.sqrt(1.0 - beta3 ** step)
    if clip is not None:
        grads = torch._foreach_mul(grads, clip)
    # neg_pre_grads serves as scratch: diff, then g + b2 diff, then -g for the next step.
    scratch = neg_pre_grads
    torch._foreach_add_(scratch, grads)                                   # diff
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_diffs, beta2)
    torch._foreach_add_(exp_avg_diffs, scratch, alpha=1.0 - beta2)
    torch._foreach_mul_(scratch, beta2)
    torch._foreach_add_(scratch, grads)                                   # g + b2 diff
    torch._foreach_mul_(exp_avg_sqs, beta3)
    torch._foreach_addcmul_(exp_avg_sqs, scratch, scratch, value=1.0 - beta3)
    den = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(den, bias_correction3_sqrt)
    torch._foreach_add_(den, eps)
    if no_prox:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, den, value=-lr / bias_correction1)
    torch._foreach_addcdiv_(params, exp_avg_diffs, den, value=-lr * beta2 / bias_correction2)
    if not no_prox:
        torch._foreach_div_(params, 1.0 + lr * weight_decay)
    torch._foreach_copy_(neg_pre_grads, grads)
    torch._foreach_neg_(neg_pre_grads)


def global_clip_factor(grads: list[Tensor], max_grad_norm: float, eps: float) -> Tensor:
    """``min(1, max_grad_norm / (||g||_2 + eps))`` over all grads, as a 0-dim tensor on the
    first grad's device (no host sync: the step multiplies by it on the device)."""
    device = grads[0].device
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))
    return torch.clamp(max_grad_norm / (total + eps), max=1.0)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check_group(group: dict, where: str) -> None:
    """Raise ValueError naming the field when a hyperparameter of ``group`` is invalid."""
    lr, eps, wd, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"{where}lr: must be a float >= 0, got {lr!r}; Adan's default is 1e-3")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"{where}eps: must be a float >= 0, got {eps!r}; the default is 1e-8")
    if not isinstance(wd, (int, float)) or not wd >= 0.0:
        raise ValueError(f"{where}weight_decay: must be a float >= 0, got {wd!r}; "
                         "the Adan paper recommends 0.02")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 3
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{where}betas: must be three floats in [0, 1), got {betas!r}; the "
                         "defaults are (0.98, 0.92, 0.99) (the code convention: 1 - the paper's)")
    if not isinstance(group["no_prox"], bool):
        raise ValueError(f"{where}no_prox: must be True or False, got {group['no_prox']!r}")
    if "max_grad_norm" in group:
        raise ValueError(f"{where}max_grad_norm: clipping uses one global norm over all groups, "
                         f"so it cannot be set per group (got {group['max_grad_norm']!r}); "
                         "pass it to Adan(...) instead")


class Adan(torch.optim.Optimizer):
    """Adan optimizer with the reference implementation's conventions (module docstring).

    Args:
        params: parameters or param-group dicts; a group may override ``lr``, ``betas``,
            ``eps``, ``weight_decay`` and ``no_prox``.
        lr: learning rate.
        betas: ``(b1, b2, b3)`` for the gradient, gradient-difference and squared-term EMAs
            (code convention: 1 - the paper's betas).
        eps: added to the denominator.
        weight_decay: decoupled weight decay (the paper recommends 0.02).
        max_grad_norm: if > 0, scale all grads by ``min(1, max_grad_norm / (||g|| + eps))``
            with ``||g||`` the global L2 norm over every group, before the update. ``p.grad``
            itself is left unchanged (the reference scales it in place).
        no_prox: False (default): proximal decay, ``p /= 1 + lr wd`` after the update;
            True: AdamW-style ``p *= 1 - lr wd`` before it.
        foreach: True forces the ``torch._foreach_*`` path, False the single-tensor loop
            (unless ``fused``); None chooses.
        fused: True forces the fused Triton kernel (CUDA params only), False excludes it;
            None (default) uses it when the params are on CUDA and Triton is installed.

    ``restart_opt()`` zeroes the moments and the step count (the reference's restart).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        no_prox: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(max_grad_norm, (int, float)) or not max_grad_norm >= 0.0:
            raise ValueError(f"max_grad_norm: must be a float >= 0 (0 turns clipping off), "
                             f"got {max_grad_norm!r}")
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}: must be True, False or None, got {value!r}")
        if foreach and fused:
            raise ValueError("foreach/fused: choose one implementation, got foreach=True and "
                             "fused=True; leave both None to choose automatically")
        if isinstance(betas, list):
            betas = tuple(betas)
        self.max_grad_norm = float(max_grad_norm)
        self._plans: dict = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        no_prox=no_prox, foreach=foreach, fused=fused)
        _check_group(defaults, "")
        super().__init__(params, defaults)
        if fused:
            bad = [p.device for g in self.param_groups for p in g["params"] if not p.is_cuda]
            if bad or not triton_available():
                raise ValueError(
                    f"fused: the fused kernel needs CUDA parameters and Triton, got params on "
                    f"{sorted(set(map(str, bad))) or 'cuda'} and triton "
                    f"{'installed' if triton_available() else 'missing'}; move the model to the "
                    "GPU first or leave fused=None")

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        # Check before adding, so that a rejected group leaves the optimizer as it was.
        _check_group({**self.defaults, **param_group}, f"param_groups[{len(self.param_groups)}].")
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("step", 0)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("max_grad_norm", 0.0)
        for group in self.param_groups:
            group.setdefault("no_prox", False)
            group.setdefault("step", 0)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    @torch.no_grad()
    def restart_opt(self) -> None:
        """Zero the moments and the step count, as the reference's ``restart_opt``."""
        for group in self.param_groups:
            group["step"] = 0
            for p in group["params"]:
                state = self.state[p]
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                    if key in state:
                        state[key].zero_()
                # neg_pre_grad is re-initialised from the grad at the next step (step == 1).

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        clip = None
        if self.max_grad_norm > 0.0:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                self._check_dense(grads)
                clip = global_clip_factor(grads, self.max_grad_norm, self.defaults["eps"])

        for index, group in enumerate(self.param_groups):
            group["step"] += 1
            lists = self._gather(group, clip)
            if not lists[0]:
                continue
            kwargs = dict(beta1=group["betas"][0], beta2=group["betas"][1],
                          beta3=group["betas"][2], lr=group["lr"], eps=group["eps"],
                          weight_decay=group["weight_decay"], no_prox=group["no_prox"],
                          step=group["step"], clip=clip)
            impl = self._choose(group, lists[0][0])
            if impl == "fused":
                self._fused_step(index, lists, kwargs)
            elif impl == "foreach":
                adan_foreach(*lists, **kwargs)
            else:
                adan_single_tensor(*lists, **kwargs)
        return loss

    @staticmethod
    def _check_dense(grads: list[Tensor]) -> None:
        for g in grads:
            if g.is_sparse:
                raise ValueError("params: Adan does not support sparse gradients, got a sparse "
                                 f"grad of shape {tuple(g.shape)}; use a dense embedding "
                                 "(nn.Embedding(sparse=False)) or torch.optim.SparseAdam for it")

    def _gather(self, group: dict, clip: Tensor | None) -> list[list[Tensor]]:
        """Lists (params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads) of the
        group's params that have a grad, creating state as the reference does."""
        lists: list[list[Tensor]] = [[] for _ in range(6)]
        params = [p for p in group["params"] if p.grad is not None]
        self._check_dense([p.grad for p in params])
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "neg_pre_grad" not in state or group["step"] == 1:
                # g_prev = g at the first step, so the first diff is 0.
                neg = p.grad.neg() if clip is None else p.grad * -clip
                state["neg_pre_grad"] = neg.to(p.dtype)
            for i, t in enumerate((p, p.grad, *(state[k] for k in STATE_KEYS))):
                lists[i].append(t)
        return lists

    def _choose(self, group: dict, param: Tensor) -> str:
        if group["fused"]:
            return "fused"
        if group["foreach"] is False:
            return "single"
        if group["foreach"] is None and group["fused"] is None and param.is_cuda \
                and triton_available():
            return "fused"
        return "foreach"

    def _fused_step(self, index: int, lists: list[list[Tensor]], kwargs: dict) -> None:
        """Run the Triton kernel over the tensors it can take (contiguous, 16-byte aligned,
        one float dtype per tensor set) and the foreach path over the rest."""
        from lit.optim import adan_triton

        by_dtype: dict[tuple, list[list[Tensor]]] = {}
        rest: list[list[Tensor]] = [[] for _ in range(6)]
        for tensors in zip(*lists):
            if tensors[0].is_cuda and adan_triton.fusable(tensors):
                target = by_dtype.setdefault((tensors[0].device, tensors[0].dtype),
                                             [[] for _ in range(6)])
            else:
                target = rest
            for i, t in enumerate(tensors):
                target[i].append(t)
        for (device, dtype), sub in by_dtype.items():
            numels = tuple(p.numel() for p in sub[0])
            plan = self._plans.get((index, device, dtype))
            if plan is None or plan.numels != numels:
                plan = adan_triton.FusedPlan(numels, device)
                self._plans[(index, device, dtype)] = plan
            clip = kwargs["clip"]
            if clip is not None and clip.device != device:
                clip = clip.to(device)
            adan_triton.adan_fused(plan, sub, **{**kwargs, "clip": clip})
        if rest[0]:
            adan_foreach(*rest, **kwargs)
