"""PatchDropout for ViT / DeiT: counts, prefix tokens, order, per-sample sampling, the keep-rate
schedule, and a float64 re-derivation of a timm DeiT forward with patches dropped."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.image_classifier import ImageClassifier
from models.patch_dropout import (
    PatchDropout,
    install_patch_dropout,
    keep_count,
    patch_dropout,
    sample_keep_rate,
)


def indexed_tokens(batch: int, prefix: int, patches: int) -> torch.Tensor:
    """Token t of sample b carries the value 1000 * b + t in every channel."""
    ids = torch.arange(prefix + patches).float() + 1000 * torch.arange(batch).float()[:, None]
    return ids[:, :, None].expand(batch, prefix + patches, 3).clone()


# Worked by hand: floor(L * keep), at least 1. (10, 0.1) and (100, 0.1) are where timm's
# int(L * (1 - prob)) with prob = 1 - keep comes out one short (0.1 -> 1 - 0.9 = 0.0999...).
HAND_COUNTS = [(196, 0.5, 98), (196, 0.25, 49), (49, 0.5, 24), (49, 0.75, 36), (784, 0.25, 196), (16, 0.3, 4),
               (16, 0.01, 1), (10, 0.01, 1), (10, 0.1, 1), (100, 0.1, 10), (3, 0.99, 2), (40, 0.85, 34), (40, 0.65, 26)]


@pytest.mark.parametrize("patches, keep, expected", HAND_COUNTS)
def test_keep_count_and_the_tokens_kept_equal_hand_worked_counts(patches: int, keep: float, expected: int) -> None:
    assert keep_count(patches, keep) == expected
    out, idx = patch_dropout(indexed_tokens(2, 1, patches), keep, 1)
    assert out.shape == (2, 1 + expected, 3) and idx.shape == (2, expected)


@pytest.mark.parametrize("ordered", [True, False])
def test_kept_tokens_are_input_rows_float64(ordered: bool) -> None:
    """Independent of how the layer picks them: every kept row is found again among the input
    rows by exact float64 equality (random rows are distinct), the prefix is untouched, each
    sample keeps 98 distinct patches of its own, in raster order when ordered."""
    torch.manual_seed(1)
    batch, prefix, patches, dim = 32, 2, 196, 6
    x = torch.randn(batch, prefix + patches, dim, dtype=torch.float64)
    out, idx = patch_dropout(x, 0.5, prefix, ordered=ordered)
    assert out.shape == (batch, prefix + 98, dim) and out.dtype == torch.float64
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    match = (out[:, prefix:, None, :] == x[:, None, prefix:, :]).all(-1)  # (B, 98, 196): kept row j is patch i
    assert (match.sum(-1) == 1).all()  # each kept row is exactly one input patch of the same sample
    found = match.float().argmax(-1)  # (B, 98) patch positions, read back from the values
    assert torch.equal(found, idx)
    assert all(len(set(row.tolist())) == 98 for row in found)  # without replacement
    increasing = (found.diff(dim=1) > 0).all(dim=1)
    assert increasing.all() if ordered else not increasing.any()  # a sorted shuffle of 98: p = 1/98!
    assert len({tuple(row.tolist()) for row in found}) == batch  # per-sample draws, not one shared subset


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("ordered", [True, False])
def test_prefix_tokens_kept_and_patches_a_subset(prefix: int, ordered: bool) -> None:
    torch.manual_seed(0)
    x = indexed_tokens(64, prefix, 20)
    out, idx = patch_dropout(x, 0.5, prefix, ordered=ordered)
    assert out.shape == (64, prefix + 10, 3)
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    ids = out[:, prefix:, 0] - 1000 * torch.arange(64)[:, None]  # token index within its sample
    assert torch.equal(ids.long(), idx + prefix)
    assert ((ids >= prefix) & (ids < prefix + 20)).all()
    assert all(len(set(row.tolist())) == 10 for row in ids)  # without replacement
    is_sorted = (ids.diff(dim=1) > 0).all(dim=1)
    if ordered:
        assert is_sorted.all()
    else:  # timm's order: shuffled; 64 sorted draws out of 10! orders would be a broken sampler
        assert not is_sorted.all()


@pytest.mark.parametrize("ordered", [True, False])
def test_each_sample_draws_its_own_uniform_subset(ordered: bool) -> None:
    torch.manual_seed(0)
    batch, patches, keep = 4000, 16, 0.25
    _, idx = patch_dropout(indexed_tokens(batch, 1, patches), keep, 1, ordered=ordered)
    chosen = torch.zeros(batch, patches).scatter_(1, idx, 1.0)
    assert (chosen.sum(1) == 4).all()
    # Marginal inclusion probability k / L = 4 / 16 for every position: binomial(4000, 1/4),
    # sigma = sqrt(0.25 * 0.75 / 4000) = 0.00685; 5 sigma is 0.034.
    freq = chosen.mean(0)
    assert ((freq - 0.25).abs() < 0.034).all(), freq
    # Samples are independent: two samples share on average k^2 / L = 1 position, and almost
    # no pair of neighbours has the same subset (1 / C(16, 4) = 1/1820 by chance).
    overlap = (chosen[1:] * chosen[:-1]).sum(1).mean()
    assert abs(overlap.item() - 1.0) < 0.1
    same = (chosen[1:] == chosen[:-1]).all(1).float().mean()
    assert same < 0.01


def test_random_keep_rate_schedule_matches_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_keep_rate(gen) for _ in range(22000)])
    support = {round(1 - i / 20, 2) for i in range(11)}
    assert {round(v, 2) for v in draws.tolist()} == support
    # P(1.0) = 1/2 + 1/2 * 1/11; every other value 1/2 * 1/11.
    assert abs((draws == 1.0).float().mean().item() - (0.5 + 0.5 / 11)) < 0.015
    assert abs((draws == 0.5).float().mean().item() - 0.5 / 11) < 0.01


def test_layer_is_identity_in_eval_and_draws_rates_in_train() -> None:
    layer = PatchDropout(keep_rate=0.5, schedule="random", num_prefix_tokens=1)
    x = torch.randn(2, 1 + 40, 8)
    assert layer.eval()(x) is x
    layer.train()
    torch.manual_seed(1)
    seen = set()
    by_hand = {1.0: 40, 0.95: 38, 0.9: 36, 0.85: 34, 0.8: 32, 0.75: 30, 0.7: 28, 0.65: 26, 0.6: 24, 0.55: 22,
               0.5: 20}  # floor(40 * rate) for the schedule's 11 rates
    for _ in range(60):
        out = layer(x)
        seen.add(layer.last_keep_rate)
        assert out.shape[1] == 1 + by_hand[round(layer.last_keep_rate, 2)]
        assert layer.last_tokens == out.shape[1] - 1
    assert 1.0 in seen and len(seen) > 3


def _deit(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, img_size=32, num_classes=5, depth=2, **kwargs).double()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deit_train_forward_equals_float64_rederivation(name: str) -> None:
    """Train-mode logits with patches dropped == blocks run by hand on the kept tokens, with the
    position embedding added before the drop and every prefix token kept."""
    torch.manual_seed(0)
    model = _deit(name, patch_size=8)  # 16 patches
    layer = install_patch_dropout(model, keep_rate=0.5)
    assert layer.num_prefix_tokens == (2 if "distilled" in name else 1)
    model.train()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    logits = model(images)
    idx = layer.last_indices
    assert idx.shape == (3, 8)

    with torch.no_grad():
        prefix = layer.num_prefix_tokens
        patches = model.patch_embed(images) + model.pos_embed[:, prefix:]  # (B, 16, D)
        kept = torch.stack([patches[b, idx[b]] for b in range(3)])
        tokens = [model.cls_token.expand(3, -1, -1)]
        if prefix == 2:
            tokens.append(model.dist_token.expand(3, -1, -1))
        x = torch.cat([torch.cat(tokens, 1) + model.pos_embed[:, :prefix], kept], 1)
        for block in model.blocks:
            x = block(x)
        x = model.norm(x)
        expected = model.head(x[:, 0])
        if prefix == 2:  # distilled inference head: mean of the class and distillation heads
            expected = (expected + model.head_dist(x[:, 1])) / 2
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-12)


def test_eval_uses_every_patch() -> None:
    torch.manual_seed(0)
    model = _deit("deit_tiny_patch16_224", patch_size=8)
    plain = _deit("deit_tiny_patch16_224", patch_size=8)
    plain.load_state_dict(model.state_dict())
    install_patch_dropout(model, keep_rate=0.25)
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval()
    assert torch.equal(model(images), plain.eval()(images))
    model.train()
    model(images)
    assert seen == [1 + 16, 1 + 4]


def test_register_tokens_are_prefix_tokens() -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                              reg_tokens=4, no_embed_class=True, num_classes=3)
    layer = install_patch_dropout(model, keep_rate=0.5)
    assert layer.num_prefix_tokens == 5
    captured = {}
    model.patch_drop.register_forward_hook(lambda mod, inp, out: captured.update(inp=inp[0], out=out))
    model.train()(torch.randn(2, 3, 32, 32))
    assert captured["out"].shape[1] == 5 + 8
    assert torch.equal(captured["out"][:, :5], captured["inp"][:, :5])


def test_image_classifier_installs_ours_with_the_options() -> None:
    model = ImageClassifier(backbone="deit_fmnist_tiny_patch4_28", in_chans=1, keep_rate=0.5,
                            keep_rate_schedule="random", ordered=False)
    layer = model.backbone.patch_drop
    assert isinstance(layer, PatchDropout)
    assert (layer.keep_rate, layer.schedule, layer.ordered, layer.num_prefix_tokens) == (0.5, "random", False, 1)
    assert isinstance(ImageClassifier(in_chans=1).backbone.patch_drop, nn.Identity)  # keep 1.0: off


def test_bad_configuration_names_the_field() -> None:
    with pytest.raises(ValueError, match="keep_rate must be in"):
        PatchDropout(keep_rate=0.0)
    with pytest.raises(ValueError, match="keep_rate_schedule"):
        PatchDropout(keep_rate=0.5, schedule="cosine")
    with pytest.raises(ValueError, match="backbone: Linear has no `patch_drop` slot"):
        install_patch_dropout(nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="keep_rate must be in"):
        ImageClassifier(keep_rate=1.5)
    with pytest.raises(ValueError, match="keep_rate_schedule"):
        ImageClassifier(keep_rate_schedule="sometimes")


@pytest.mark.gpu
def test_gpu_bf16_deit_matches_timm_in_eval_and_trains() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", num_classes=10).to(device)
    reference = timm.create_model("deit_small_patch16_224", num_classes=10).to(device)
    reference.load_state_dict(model.state_dict())
    layer = install_patch_dropout(model, keep_rate=0.5)
    images = torch.randn(16, 3, 224, 224, device=device)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference.eval()(images))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.train()(images).float().logsumexp(-1).mean()
    loss.backward()
    assert layer.last_tokens == 98 and layer.last_indices.device.type == "cuda"
