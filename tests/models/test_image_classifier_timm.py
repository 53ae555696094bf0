"""ImageClassifier against timm directly: same weights, same eval output."""

from __future__ import annotations

import pytest
import timm
import torch

import models.timm_tiny  # noqa: F401
from models.image_classifier import ImageClassifier


@pytest.mark.parametrize("name", ["deit_fmnist_tiny_patch4_28", "deit_tiny_patch16_224"])
def test_eval_output_equals_timm_for_same_weights(name: str) -> None:
    torch.manual_seed(0)
    size = 28 if "fmnist" in name else 64
    chans = 1 if "fmnist" in name else 3
    ours = ImageClassifier(backbone=name, num_classes=10, in_chans=chans, img_size=size,
                           keep_rate=0.5).eval()
    reference = timm.create_model(name, num_classes=10, in_chans=chans, img_size=size).eval()
    reference.load_state_dict(ours.backbone.state_dict())
    images = torch.randn(4, chans, size, size)
    with torch.no_grad():
        assert torch.equal(ours(images), reference(images))


def test_backbone_given_as_a_module_is_used_as_is() -> None:
    backbone = timm.create_model("deit_fmnist_tiny_patch4_28", num_classes=7)
    model = ImageClassifier(backbone=backbone)
    assert model.backbone is backbone
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_backbone_names_the_field() -> None:
    with pytest.raises(ValueError, match="backbone: timm has no model named 'deit_nonexistent'"):
        ImageClassifier(backbone="deit_nonexistent")


def test_no_weight_decay_on_norms_biases_and_tokens() -> None:
    model = ImageClassifier(backbone="deit_fmnist_tiny_patch4_28", in_chans=1)
    decay, no_decay = model.optimizer_groups()
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed"} <= no_decay_names
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.backbone.parameters()))
