"""Lazy attribute access for the package registries (``models``, ``datamodules``, ...).

``models.ImageClassifier`` in YAML imports ``models.image_classifier`` only when it is looked
up, so importing a registry package (and ``python -m lit --help``) pulls in no timm,
transformers or torchrec.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_getattr(package: str, registry: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` resolving ``registry[name]`` (a module path) on demand."""

    def __getattr__(name: str) -> object:
        if name in registry:
            return getattr(import_module(registry[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
