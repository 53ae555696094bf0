"""LightningModules. Each is imported on first use, so the CLI starts without timm,
transformers or torchrec; ``models.ImageClassifier`` in YAML imports only what it needs."""

from lit.lazy import lazy_getattr

_LAZY = {
    "ImageClassifier": "models.image_classifier",
    "BertClassifier": "models.bert_classifier",
    "DLRMModule": "models.dlrm.module",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("models", _LAZY)
