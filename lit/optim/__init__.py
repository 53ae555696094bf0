"""Optimizers usable from the CLI (``--optimizer Adan``) and YAML (``class_path: lit.optim.Adan``)."""

from importlib import import_module

_LAZY = {
    "Adan": "lit.optim.adan",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit.optim' has no attribute {name!r}")
