"""Lightning callbacks, one per file, imported on first use (see ``models/__init__.py``).
Select them in YAML under ``trainer.callbacks`` with ``class_path: callbacks.NAME``."""

from importlib import import_module

_LAZY = {
    "NMPruning": "callbacks.nm_pruning",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
