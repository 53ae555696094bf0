"""Optimizers usable from the CLI (``--optimizer Adan``) and YAML (``class_path: lit.optim.Adan``)."""

from lit.lazy import lazy_getattr

_LAZY = {
    "Adan": "lit.optim.adan",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("lit.optim", _LAZY)
