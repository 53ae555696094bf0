"""Lightning callbacks, one per file, imported on first use (see ``models/__init__.py``).
Select them in YAML under ``trainer.callbacks`` with ``class_path: callbacks.NAME``."""

from lit.lazy import lazy_getattr

_LAZY = {
    "NMPruning": "callbacks.nm_pruning",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("callbacks", _LAZY)
