"""Structured PatchDropout for timm's Swin: exact at keep 1.0, hand-built kept positions, the
gathered relative-position index and masks against timm's own, a window-n block against timm's
block built with window n, and tokens per stage shrinking as (n/7)^2."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock, get_relative_position_index

import models.timm_tiny  # noqa: F401
from models.image_classifier import ImageClassifier
from models.swin_patch_dropout import (
    PatchDropoutSwinTransformer,
    drop_rows_cols,
    install_swin_patch_dropout,
    kept_positions,
    kept_window_size,
    relative_position_index,
    sample_rows_cols,
    shifted_window_mask,
    swin_features_dropped,
    window_block_forward,
)

TINY = "swin_fmnist_tiny_patch2_window7_28"


def _swin(name: str = TINY, **kwargs):
    size = kwargs.pop("img_size", 28)
    chans = 1 if "fmnist" in name else 3
    return timm.create_model(name, img_size=size, in_chans=chans, num_classes=5, **kwargs)


@pytest.mark.parametrize("keep, n", [(1.0, 7), (0.9, 6), (0.75, 5), (0.5, 3), (0.3, 2), (0.25, 1), (0.1, 1)])
def test_kept_window_size_is_int_of_keep_times_seven(keep: float, n: int) -> None:
    assert kept_window_size(keep, 7) == n


def test_keep_one_and_eval_equal_timm_exactly() -> None:
    torch.manual_seed(0)
    reference = _swin().train()
    full = ImageClassifier(backbone=TINY, num_classes=5, in_chans=1, keep_rate=1.0).train()
    full.backbone.load_state_dict(reference.state_dict())
    images = torch.randn(3, 1, 28, 28)
    assert torch.equal(full(images), reference(images))
    dropped = ImageClassifier(backbone=TINY, num_classes=5, in_chans=1, keep_rate=0.5)
    assert isinstance(dropped.backbone, PatchDropoutSwinTransformer)
    dropped.backbone.load_state_dict(reference.state_dict())  # no new parameters or buffers
    assert torch.equal(dropped.eval()(images), reference.eval()(images))


SLIM = {"embed_dim": 16, "num_heads": (1, 2, 2, 4)}  # Swin-T's layout, narrow for speed


@pytest.mark.parametrize("name, size, kwargs", [(TINY, 28, {}), ("swin_fmnist_small_patch2_window7_28", 28, {}),
                                                ("swin_tiny_patch4_window7_224", 112, SLIM)])
def test_dropped_path_with_every_row_and_column_equals_timm(name: str, size: int, kwargs: dict) -> None:
    """Our block loop (gathered bias, own masks, clipped last stages) reproduces timm in float64."""
    torch.manual_seed(0)
    model = _swin(name, img_size=size, **kwargs).double().eval()
    install_swin_patch_dropout(model, keep_rate=0.5)
    chans = model.patch_embed.proj.in_channels
    images = torch.randn(2, chans, size, size, dtype=torch.float64)
    everything = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ours = model.forward_head(swin_features_dropped(model, images, everything, everything))
        reference = timm.models.swin_transformer.SwinTransformer.forward(model, images)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_kept_positions_hand_built() -> None:
    """14x14 grid, windows of 7: sample 0 keeps rows (1, 4, 6) and columns (0, 2, 3) of each
    window; sample 1 rows (0, 5, 6) and columns (2, 3, 6)."""
    rows = torch.tensor([[1, 4, 6], [0, 5, 6]])
    cols = torch.tensor([[0, 2, 3], [2, 3, 6]])
    grid = torch.stack(torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij"), -1)  # (14, 14, 2)
    x = grid.expand(2, 14, 14, 2)
    out = drop_rows_cols(x, rows, cols, 7)
    assert out.shape == (2, 6, 6, 2)
    kept_rows = [[1, 4, 6, 8, 11, 13], [0, 5, 6, 7, 12, 13]]
    kept_cols = [[0, 2, 3, 7, 9, 10], [2, 3, 6, 9, 10, 13]]
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert out[b, i, j].tolist() == [kept_rows[b][i], kept_cols[b][j]]
    flat = kept_positions(rows, cols, (14, 14), 7)
    assert flat[1, :6].tolist() == [0 * 14 + c for c in kept_cols[1]]


def test_relative_position_index_is_timms_gathered_at_the_kept_positions() -> None:
    full = get_relative_position_index(7, 7)  # (49, 49), timm's own
    rows = torch.tensor([[1, 4, 6], [0, 2, 3]])
    cols = torch.tensor([[0, 2, 3], [1, 5, 6]])
    ours = relative_position_index(rows, cols, (7, 7))
    for b in range(2):
        keep = (rows[b][:, None] * 7 + cols[b][None, :]).flatten()
        assert torch.equal(ours[b], full[keep][:, keep])


@pytest.mark.parametrize("size, window, shift", [(14, 7, 3), (6, 3, 1), (10, 5, 2), (8, 4, 2)])
def test_shifted_window_mask_equals_timms(size: int, window: int, shift: int) -> None:
    block = SwinTransformerBlock(dim=8, input_resolution=(size, size), num_heads=1,
                                 window_size=window, shift_size=shift)
    ours = shifted_window_mask(size, size, (window, window), (shift, shift), torch.device("cpu"))
    assert torch.equal(ours, block.attn_mask)


@pytest.mark.parametrize("shift", [0, 1])
def test_window_n_block_equals_timm_block_built_with_window_n(shift: int) -> None:
    """Keeping rows = cols = (0, 1, 2) makes the kept windows dense 3x3 windows; a timm block
    built with window 3 (bias table = the 7-table's entries for offsets -2..2) must agree."""
    torch.manual_seed(0)
    model = _swin().double()
    block7 = model.layers[0].blocks[1 if shift else 0]
    dim, heads = block7.norm1.normalized_shape[0], block7.attn.num_heads
    block3 = SwinTransformerBlock(dim=dim, input_resolution=(6, 6), num_heads=heads, window_size=3,
                                  shift_size=shift, mlp_ratio=2.0).double().eval()
    state = {k: v for k, v in block7.state_dict().items() if "relative_position" not in k and "attn_mask" not in k}
    block3.load_state_dict(state, strict=False)
    table7 = block7.attn.relative_position_bias_table.detach()
    with torch.no_grad():
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                block3.attn.relative_position_bias_table[(dr + 2) * 5 + (dc + 2)] = table7[(dr + 6) * 13 + (dc + 6)]
    x = torch.randn(2, 6, 6, dim, dtype=torch.float64)
    first = torch.arange(3).expand(2, 3)
    with torch.no_grad():
        ours = window_block_forward(block7.eval(), x, (3, 3), (shift, shift), relative_position_index(first, first, (7, 7)))
        reference = block3(x)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_tokens_per_stage_shrink_as_n_over_7_squared_and_gradients_flow() -> None:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, depths=(1, 1, 1, 1), **SLIM)
    layer = install_swin_patch_dropout(model, keep_rate=0.5)
    out = model.train()(torch.randn(2, 3, 224, 224))
    n = 3
    assert layer.last_stage_tokens == [int(3136 * n * n / 49), int(784 * n * n / 49), int(196 * n * n / 49),
                                       int(49 * n * n / 49)]
    assert layer.last_tokens == 576
    out.sum().backward()
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_rows_and_columns_are_drawn_per_sample_uniformly() -> None:
    torch.manual_seed(0)
    rows, cols = sample_rows_cols(3000, 7, 3)
    assert (rows.diff(dim=1) > 0).all() and (cols.diff(dim=1) > 0).all()  # sorted, distinct
    freq = torch.zeros(3000, 7).scatter_(1, rows, 1.0).mean(0)
    assert ((freq - 3 / 7).abs() < 5 * (3 / 7 * 4 / 7 / 3000) ** 0.5).all()
    assert (rows[1:] != rows[:-1]).any(1).float().mean() > 0.9  # C(7, 3) = 35 subsets
    assert not torch.equal(rows, cols)


def test_bad_configuration_names_the_field() -> None:
    with pytest.raises(ValueError, match="img_size: the patch grid"):
        install_swin_patch_dropout(timm.create_model("swin_tiny_patch4_window7_224", img_size=96,
                                                     depths=(1, 1, 1, 1), **SLIM), 0.5)
    with pytest.raises(ValueError, match="backbone: Swin PatchDropout needs a timm SwinTransformer"):
        install_swin_patch_dropout(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="keep_rate must be in"):
        install_swin_patch_dropout(_swin(), 0.0)
    with pytest.raises(ValueError, match="keep_rate_schedule must be 'fixed' or 'random', got 'cosine'"):
        install_swin_patch_dropout(_swin(), 0.5, "cosine")
    with pytest.raises(ValueError, match=r"backbone: Swin PatchDropout needs square windows, got \(7, 14\)"):
        install_swin_patch_dropout(_swin(window_size=(7, 14)), 0.5)
    with pytest.raises(ValueError, match=r"backbone: Swin PatchDropout needs square windows"):
        ImageClassifier(backbone=_swin(window_size=(7, 14)), keep_rate=0.5)


@pytest.mark.gpu
def test_gpu_bf16_train_step_and_exact_eval() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10).to(device)
    reference = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10).to(device)
    reference.load_state_dict(model.state_dict())
    install_swin_patch_dropout(model, keep_rate=0.5)
    images = torch.randn(8, 3, 224, 224, device=device)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference.eval()(images))
        everything = torch.arange(7, device=device).expand(8, 7)
        ours = model.forward_head(swin_features_dropped(model, images, everything, everything))
        torch.testing.assert_close(ours, reference(images), rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.train()(images).float().logsumexp(-1).mean()
    loss.backward()
    assert model.patch_drop.last_stage_tokens == [576, 144, 36, 9]
