"""ImageClassifier on timm: same weights and eval output as timm, PatchDropout installed and
active in training, the model summary's FLOPs against a hand count, the mixup loss against a
float64 re-derivation, and bad arguments naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary

import models.timm_tiny  # noqa: F401
from models.image_classifier import ImageClassifier
from models.patch_dropout import PatchDropout


@pytest.mark.parametrize("name", ["deit_fmnist_tiny_patch4_28", "deit_tiny_patch16_224"])
def test_same_weights_as_timm_and_patch_dropout_active_only_in_training(name: str) -> None:
    torch.manual_seed(0)
    size, chans = (28, 1) if "fmnist" in name else (64, 3)
    ours = ImageClassifier(backbone=name, num_classes=10, in_chans=chans, img_size=size, keep_rate=0.5)
    reference = timm.create_model(name, num_classes=10, in_chans=chans, img_size=size).eval()
    reference.load_state_dict(ours.backbone.state_dict())  # PatchDropout adds no parameters
    assert isinstance(ours.backbone.patch_drop, PatchDropout)
    tokens_in = []
    ours.backbone.blocks[0].register_forward_pre_hook(lambda mod, args: tokens_in.append(args[0].shape[1]))
    images = torch.randn(4, chans, size, size)
    patches = (size // ours.backbone.patch_embed.patch_size[0]) ** 2
    with torch.no_grad():
        assert torch.equal(ours.eval()(images), reference(images))  # eval: every patch
        ours.train()(images)
    assert tokens_in == [1 + patches, 1 + patches // 2]  # training: half the patches, class token kept


def test_model_summary_flops_equal_a_hand_count() -> None:
    """deit_fmnist_tiny: 49 patches of 4x4x1, 50 tokens, D = 64, 4 blocks, MLP 128, 10 classes.
    Matmul FLOPs are 2 x (multiply-adds); attention is QK^T and AV: 2 x 2 x N^2 x D."""
    model = ImageClassifier(in_chans=1)
    n, d, hidden = 50, 64, 128
    block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * hidden + 4 * n * n * d
    expected = 2 * 49 * d * 16 + 4 * block + 2 * d * 10
    assert ModelSummary(model).total_flops == expected == 15_768_832
    assert model.example_input_array.shape == (1, 1, 28, 28)


def test_backbone_given_as_a_module_is_used_as_is() -> None:
    backbone = timm.create_model("deit_fmnist_tiny_patch4_28", num_classes=7)
    model = ImageClassifier(backbone=backbone)
    assert model.backbone is backbone and model.train_acc.num_classes == 7
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert model.example_input_array.shape == (1, 1, 28, 28)  # from the module, not in_chans=3


def test_mixup_loss_equals_a_float64_rederivation() -> None:
    """timm's Mixup draws lam from numpy after one rand() for the mix probability; the loss is
    the soft-target cross-entropy of the mixed batch x lam + x.flip(0) (1 - lam)."""
    torch.manual_seed(0)
    model = ImageClassifier(in_chans=1, mixup_alpha=0.8, label_smoothing=0.1).double().eval()
    images = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    labels = torch.tensor([3, 1, 3, 7])
    np.random.seed(0)
    logits, loss = model.training_loss((images.clone(),), labels)
    np.random.seed(0)
    np.random.rand()
    lam = float(np.random.beta(0.8, 0.8))
    smooth = torch.full((4, 10), 0.1 / 10, dtype=torch.float64)
    target = smooth.scatter(1, labels[:, None], 1 - 0.1 + 0.1 / 10)
    target = lam * target + (1 - lam) * target.flip(0)
    with torch.no_grad():
        expected_logits = model(lam * images + (1 - lam) * images.flip(0))
    expected = -(target * expected_logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(logits.detach(), expected_logits, rtol=0, atol=1e-12)
    # timm builds the soft targets in float32 (one_hot's default dtype): 1e-7 of rounding.
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)


def test_unknown_backbone_names_the_field() -> None:
    with pytest.raises(ValueError, match="backbone: timm has no model named 'deit_nonexistent'"):
        ImageClassifier(backbone="deit_nonexistent")


@pytest.mark.parametrize("kwargs, message", [
    ({"mixup_alpha": -0.1}, "mixup_alpha and cutmix_alpha must be >= 0 \\(0 = off\\), got -0.1 and 0.0"),
    ({"cutmix_alpha": -1.0}, "mixup_alpha and cutmix_alpha must be >= 0 \\(0 = off\\), got 0.0 and -1.0"),
    ({"throughput_every_n_steps": 0}, "throughput_every_n_steps must be >= 1, got 0"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in \\[0, 1\\), got 1.0"),
    ({"keep_rate": 1.5}, "keep_rate must be in \\(0, 1\\], got 1.5"),
    ({"keep_rate": 0.0}, "keep_rate must be in \\(0, 1\\], got 0.0"),
    ({"keep_rate_schedule": "sometimes"}, "keep_rate_schedule must be 'fixed' or 'random', got 'sometimes'"),
])
def test_bad_arguments_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageClassifier(in_chans=1, **kwargs)


def test_no_weight_decay_on_norms_biases_and_tokens() -> None:
    model = ImageClassifier(backbone="deit_fmnist_tiny_patch4_28", in_chans=1)
    decay, no_decay = model.optimizer_groups()
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed"} <= no_decay_names
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.backbone.parameters()))
