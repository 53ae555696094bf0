"""LightningModules. Each is imported on first use, so the CLI starts without timm,
transformers or torchrec; ``models.ImageClassifier`` in YAML imports only what it needs."""

from importlib import import_module

_LAZY = {
    "ImageClassifier": "models.image_classifier",
    "BertClassifier": "models.bert_classifier",
    "DLRMModule": "models.dlrm",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
