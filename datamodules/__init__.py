"""LightningDataModules, imported on first use (see ``models/__init__.py``)."""

from importlib import import_module

_LAZY = {
    "FashionMNIST": "datamodules.fashion_mnist",
    "ImageFolder": "datamodules.image_folder",
    "TextClassification": "datamodules.text_classification",
    "CriteoTSV": "datamodules.criteo",
    "SyntheticCTR": "datamodules.synthetic_ctr",
    "MovieLens100K": "datamodules.movielens",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
