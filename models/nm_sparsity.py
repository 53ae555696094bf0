"""N:M structured sparsity: masks, checks, reports and the 2:4 export for GPU inference.

An N:M sparse weight keeps at most N non-zeros in every group of M consecutive weights along
its INPUT dimension (the last dimension of an ``nn.Linear`` weight of shape ``(out, in)``), the
layout that sparse tensor cores multiply (Mishra et al., "Accelerating Sparse Deep Neural
Networks", arXiv 2104.08378; NVIDIA ASP's ``m4n2_1d``). Fang, Zhou and Wang ("An Algorithm-Hardware
Co-Optimized Framework for Accelerating N:M Sparse Transformers", IEEE TVLSI 2022) prune BERT's
encoder Linear layers this way; :class:`callbacks.NMPruning` applies these functions during
training.

Tie rule of :func:`nm_mask`: inside a group, weights are ranked by ``|w|`` (largest first) and
equal magnitudes are ranked by position, the lower input index first. So ``[0, 0, 0, 0]`` under
2:4 keeps positions 0 and 1, and ``[1, -1, 1, 0.5]`` keeps positions 0 and 1.

Shapes: ``O`` output features, ``I`` input features, ``G = I / M`` groups per row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

# cuSPARSELt (the only 2:4 backend on Hopper) takes fp16/bf16 weights whose two dimensions are
# multiples of 16 (torch.sparse.SparseSemiStructuredTensorCUSPARSELT's shape constraints).
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SEMI_STRUCTURED_MULTIPLE = 16


__all__ = ["parse_pattern", "check_nm", "nm_mask", "is_nm_sparse", "select_linears",
           "sparsity_report", "semi_structured_refusal", "export_sparse_24"]

def parse_pattern(pattern: str, field: str = "pattern") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; rejects anything that is not ``N:M`` with ``1 <= N < M``."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if match is None:
        raise ValueError(f"{field}: expected 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    check_nm(n, m, field=field)
    return n, m


def check_nm(n: int, m: int, in_features: int | None = None, field: str = "pattern") -> None:
    """Raise ``ValueError`` unless ``1 <= n < m`` and ``m`` divides ``in_features`` (when given)."""
    if m < 2 or not 1 <= n < m:
        raise ValueError(
            f"{field}: N:M needs 1 <= N < M (N = weights kept per group of M), got {n}:{m}; "
            f"use e.g. 2:4, 4:8 or 1:4"
        )
    if in_features is not None and in_features % m:
        raise ValueError(
            f"{field}: M={m} does not divide the input dimension {in_features}; groups of M run "
            f"along the input dimension, so choose an M that divides {in_features} or exclude "
            f"this layer"
        )


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` in each group of ``m`` along the last dim.

    Args:
        weight: ``(..., I)`` tensor, e.g. a Linear weight ``(O, I)``; ``m`` must divide ``I``.
        n: weights kept per group.
        m: group size.

    Returns:
        A ``bool`` tensor shaped like ``weight`` with exactly ``n`` True per group. Ties are
        broken by position, lower index first (see the module docstring).
    """
    check_nm(n, m, weight.shape[-1] if weight.ndim else None)
    if weight.ndim == 0:
        raise ValueError(f"weight: N:M needs at least one dimension, got shape {tuple(weight.shape)}")
    groups = weight.detach().abs().reshape(*weight.shape[:-1], -1, m)  # (..., G, M)
    # A stable descending sort keeps equal magnitudes in index order: that is the tie rule.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(weight.shape)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the last dim holds at most ``n`` non-zeros."""
    check_nm(n, m)
    if weight.ndim == 0 or weight.shape[-1] % m:
        return False
    nonzero = (weight.detach() != 0).reshape(*weight.shape[:-1], -1, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def select_linears(
    module: nn.Module, include: Iterable[str], exclude: Iterable[str] = ()
) -> dict[str, nn.Linear]:
    """``nn.Linear`` sub-modules whose name matches an ``include`` regex and no ``exclude`` one.

    Names are those of ``module.named_modules()`` and the regexes are matched with
    ``re.search``, so ``"encoder\\.layer"`` selects every Linear inside a BERT encoder.
    """
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear)
        and any(p.search(name) for p in inc)
        and not any(p.search(name) for p in exc)
    }


def sparsity_report(layers: dict[str, nn.Module]) -> dict[str, float]:
    """Fraction of exactly-zero weights of each layer (keys are the layer names)."""
    return {name: float((layer.weight.detach() == 0).float().mean()) for name, layer in layers.items()}


def semi_structured_refusal(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot become a 2:4 ``SparseSemiStructuredTensor``, or ``None`` if it can."""
    if weight.ndim != 2:
        return f"needs a 2-D weight, got shape {tuple(weight.shape)}"
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"needs float16 or bfloat16 weights, got {weight.dtype}; cast the model first (model.to(torch.bfloat16))"
    rows, cols = weight.shape
    k = SEMI_STRUCTURED_MULTIPLE
    if rows % k or cols % k:
        return f"needs both dimensions to be multiples of {k} (cuSPARSELt), got shape {tuple(weight.shape)}"
    if not is_nm_sparse(weight, 2, 4):
        return "is not 2:4 sparse (prune it first: callbacks.NMPruning or nm_mask(w, 2, 4))"
    if weight.device.type != "cuda":
        return f"must be on a CUDA device (the 2:4 kernels are GPU-only), got {weight.device}"
    return None


def export_sparse_24(module: nn.Module, include: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Replace the selected Linear weights by 2:4 ``SparseSemiStructuredTensor`` s, in place.

    ``torch.sparse.to_sparse_semi_structured`` compresses a weight that is ALREADY 2:4 sparse
    (it does not prune); on Hopper it runs on cuSPARSELt. Every selected layer is checked first
    and nothing is converted when one refuses, so a model is never left half exported.

    Returns:
        The converted layer names. Raises ``ValueError`` listing every refusing layer.
    """
    from torch.sparse import to_sparse_semi_structured

    layers = select_linears(module, include, exclude)
    if not layers:
        raise ValueError(f"include: no nn.Linear matches {list(include)!r} (minus {list(exclude)!r})")
    refusals = {name: semi_structured_refusal(layer.weight) for name, layer in layers.items()}
    refusals = {name: why for name, why in refusals.items() if why is not None}
    if refusals:
        lines = "\n".join(f"  {name}: {why}" for name, why in refusals.items())
        raise ValueError(f"export_sparse_24: {len(refusals)} layer(s) cannot be exported to 2:4:\n{lines}\n"
                         f"exclude them (exclude=[...]) or fix them as said")
    for layer in layers.values():
        sparse = to_sparse_semi_structured(layer.weight.detach().contiguous())
        layer.weight = nn.Parameter(sparse, requires_grad=False)
    return list(layers)
