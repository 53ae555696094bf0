"""N:M masks and checks against a brute-force reference, hand-worked cases, the 2:4 export."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from models.nm_sparsity import (
    export_sparse_24,
    is_nm_sparse,
    nm_mask,
    parse_pattern,
    select_linears,
    semi_structured_refusal,
    sparsity_report,
)


def brute_force_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Reference: per group, the n-subset with the largest float64 sum of |w|; among equal sums
    the lexicographically smallest index tuple (= ties go to the lower index)."""
    rows = weight.double().abs().reshape(-1, m).tolist()
    out = torch.zeros(len(rows), m, dtype=torch.bool)
    for r, group in enumerate(rows):
        best = max(itertools.combinations(range(m), n),
                   key=lambda idx: (sum(group[i] for i in idx), [-i for i in idx]))
        out[r, list(best)] = True
    return out.reshape(weight.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)])
def test_nm_mask_matches_brute_force_on_random_and_tied_weights(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    continuous = torch.randn(16, 4 * m, generator=gen)
    # Small integers: many equal magnitudes (including +x / -x and zeros) inside one group.
    tied = torch.randint(-2, 3, (16, 4 * m), generator=gen).float()
    for weight in (continuous, tied, torch.zeros(3, m)):
        mask = nm_mask(weight, n, m)
        assert torch.equal(mask, brute_force_mask(weight, n, m))
        assert torch.equal(mask.reshape(-1, m).sum(-1), torch.full((weight.numel() // m,), n))


def test_nm_mask_hand_worked_cases():
    # Ties by position, lower index first: all-zero and +-1 groups keep the first two.
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 1.0, 0.5],
                      [0.1, -3.0, 2.0, 0.5, 7.0, 7.0, -7.0, 7.0]])
    expected = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0],
                             [0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(w, 2, 4), expected)
    # Groups run along the LAST (input) dimension, also for 3-D tensors.
    w3 = torch.arange(16.0).reshape(2, 2, 4)
    assert torch.equal(nm_mask(w3, 1, 4), (torch.arange(16).reshape(2, 2, 4) % 4 == 3))


def test_is_nm_sparse():
    w = torch.randn(8, 16)
    assert not is_nm_sparse(w, 2, 4)
    pruned = w * nm_mask(w, 2, 4)
    assert is_nm_sparse(pruned, 2, 4) and is_nm_sparse(pruned, 4, 8)
    assert not is_nm_sparse(pruned, 1, 4)
    pruned[0, 0:4] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # fewer than N non-zeros is still N:M
    assert is_nm_sparse(pruned, 2, 4)
    pruned[3, 4:8] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # three in one group is not
    assert not is_nm_sparse(pruned, 2, 4)
    assert not is_nm_sparse(torch.zeros(4, 6), 2, 4)  # 4 does not divide 6


@pytest.mark.parametrize("pattern,message", [
    ("4:4", "1 <= N < M"), ("5:4", "1 <= N < M"), ("0:4", "1 <= N < M"), ("2-4", "expected 'N:M'"),
])
def test_bad_patterns_rejected(pattern, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern, field="patterns")


def test_m_must_divide_the_input_dimension():
    with pytest.raises(ValueError, match="does not divide the input dimension 6"):
        nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_mask(torch.randn(4, 8), 4, 4)


def test_select_linears_and_report():
    net = nn.Sequential()
    net.add_module("encoder", nn.ModuleDict({"q": nn.Linear(8, 8), "ffn": nn.Linear(8, 16)}))
    net.add_module("classifier", nn.Linear(16, 2))
    chosen = select_linears(net, [r"encoder\."], [r"ffn"])
    assert list(chosen) == ["encoder.q"]
    with torch.no_grad():
        chosen["encoder.q"].weight.mul_(nm_mask(chosen["encoder.q"].weight, 1, 4))
    assert sparsity_report(chosen) == {"encoder.q": 0.75}


def test_semi_structured_refusals_name_the_problem():
    w = torch.randn(32, 64)
    assert "float16 or bfloat16" in semi_structured_refusal(w)
    assert "multiples of 16" in semi_structured_refusal(torch.randn(24, 64, dtype=torch.bfloat16))
    assert "not 2:4 sparse" in semi_structured_refusal(w.bfloat16())
    pruned = (w * nm_mask(w, 2, 4)).bfloat16()
    assert "CUDA" in semi_structured_refusal(pruned)  # CPU tensor: everything else qualifies
    assert "2-D" in semi_structured_refusal(torch.zeros(2, 32, 64, dtype=torch.bfloat16))


def test_export_refuses_and_leaves_the_model_untouched():
    net = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 20)).bfloat16()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"2 layer\(s\) cannot be exported") as err:
        export_sparse_24(net, [r"\d"])
    assert "0: is not 2:4 sparse" in str(err.value) and "1: needs both dimensions" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        export_sparse_24(net, ["encoder"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (2:4 kernels)")
def test_export_sparse_24_matches_dense_on_gpu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda().bfloat16().eval()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = net(x)
        assert export_sparse_24(net, [r"^\d$"]) == ["0", "2"]
        from torch.sparse import SparseSemiStructuredTensor

        assert isinstance(net[0].weight.data, SparseSemiStructuredTensor)
        out = net(x)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
