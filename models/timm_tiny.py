"""Small timm Vision Transformers for 28x28 images, registered in timm's model registry.

DeiT-style (class token, no distillation token) with 4x4 patches, so a 28x28 Fashion-MNIST
image is 49 patch tokens. Importing this module registers the names; after that
``timm.create_model("deit_fmnist_tiny_patch4_28")`` works like any timm model.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

VIT = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "mlp_ratio": 2.0}
SWIN = {"img_size": 28, "patch_size": 2, "window_size": 7, "in_chans": 1, "num_classes": 10,
        "drop_path_rate": 0.0, "mlp_ratio": 2.0}


def _build(cls: type, kwargs: dict, **defaults):
    """``cls`` with ``defaults`` overridden by ``kwargs``, minus timm's factory extras."""
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained: the 28x28 models have no pretrained weights; set it to false")
    extras = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
    if cls is SwinTransformer:
        extras.add("patch_drop_rate")  # timm passes it; Swin has no such argument
    return cls(**{**defaults, **{k: v for k, v in kwargs.items() if k not in extras}})


@register_model
def deit_fmnist_tiny_patch4_28(**kwargs) -> VisionTransformer:
    """embed 64, depth 4, 2 heads: the quickstart model (~0.2M parameters)."""
    return _build(VisionTransformer, kwargs, **VIT, embed_dim=64, depth=4, num_heads=2)


@register_model
def deit_fmnist_small_patch4_28(**kwargs) -> VisionTransformer:
    """embed 128, depth 6, 4 heads (~0.9M parameters)."""
    return _build(VisionTransformer, kwargs, **VIT, embed_dim=128, depth=6, num_heads=4)


@register_model
def deit_fmnist_base_patch4_28(**kwargs) -> VisionTransformer:
    """embed 192, depth 8, 6 heads (~2.4M parameters)."""
    return _build(VisionTransformer, kwargs, **VIT, embed_dim=192, depth=8, num_heads=6)


@register_model
def swin_fmnist_tiny_patch2_window7_28(**kwargs) -> SwinTransformer:
    """Swin for 28x28: 2x2 patches (14x14 grid = 2x2 windows of 7), stages 14 -> 7, embed 48,
    depths (2, 2), heads (2, 4) (~0.2M parameters)."""
    return _build(SwinTransformer, kwargs, **SWIN, embed_dim=48, depths=(2, 2), num_heads=(2, 4))


@register_model
def swin_fmnist_small_patch2_window7_28(**kwargs) -> SwinTransformer:
    """Three stages 14 -> 7 -> 4 (timm pads the odd 7; the last window is clipped to 4), embed 64,
    depths (2, 2, 2), heads (2, 4, 8) (~1.6M parameters)."""
    return _build(SwinTransformer, kwargs, **SWIN, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8))
