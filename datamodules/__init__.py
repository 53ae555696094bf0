"""LightningDataModules, imported on first use (see ``models/__init__.py``)."""

from lit.lazy import lazy_getattr

_LAZY = {
    "FashionMNIST": "datamodules.fashion_mnist",
    "ImageFolder": "datamodules.image_folder",
    "TextClassification": "datamodules.text_classification",
    "CriteoTSV": "datamodules.ctr.criteo",
    "SyntheticCTR": "datamodules.ctr.synthetic",
    "MovieLens100K": "datamodules.ctr.movielens",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("datamodules", _LAZY)
