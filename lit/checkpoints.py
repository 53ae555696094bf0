"""Checks on ``--ckpt_path`` before anything runs, and where a checkpoint's run logged.

A wrong path should cost one clear line, not a traceback from deep inside ``torch.load`` or
from a model that received another model's weights. :class:`lit.module.LitModule` records its
class in every checkpoint (``"lit_module_class"``), so a checkpoint given to another model's
config is recognised by name.
"""

from __future__ import annotations

import pickle
import zipfile
from importlib import import_module
from pathlib import Path

import torch

CLASS_KEY = "lit_module_class"
META_FILE = "meta.pt"  # of a sharded checkpoint: everything but the sharded tensors


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder written with ``torch.distributed.checkpoint`` plus :data:`META_FILE` (what a
    strategy that keeps tables sharded writes, e.g. ``torchrec_ddp``, which a DLRM runs with)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_FILE).is_file()


def class_path(obj: object) -> str:
    return class_path_of(type(obj))


def check_checkpoint(path: str | Path, model_class: str | None = None) -> dict:
    """Open ``path`` as a Lightning checkpoint (weights-only, memory-mapped) and check that it
    was written by ``model_class`` (a class path); returns the checkpoint (tensors mmapped).

    Raises:
        ValueError: naming the file and what to do: missing, not a Lightning checkpoint, or a
            checkpoint of another model class.
    """
    path = Path(path)
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise ValueError(f"--ckpt_path {str(path)!r} is a folder but not a sharded "
                             f"checkpoint (no .metadata and {META_FILE}); give a .ckpt file or "
                             "a folder written by `python -m lit fit` with torchrec_ddp")
        return _check_class(path, torch.load(path / META_FILE, map_location="cpu",
                                             weights_only=True), model_class)
    if not path.is_file():
        raise ValueError(f"--ckpt_path {str(path)!r}: no such file")
    try:
        mmap = zipfile.is_zipfile(path)  # torch's format since 1.6; mmap avoids reading tables
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        # torch's own message suggests weights_only=False, i.e. running the file's code: no.
        reason = ("its content is not tensors and plain values" if isinstance(
            error, pickle.UnpicklingError) else type(error).__name__)
        raise ValueError(f"--ckpt_path {str(path)!r} is not a readable PyTorch checkpoint "
                         f"({reason}); give a .ckpt file written by `python -m lit fit`"
                         ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {str(path)!r} is a torch file but not a Lightning "
                         "checkpoint (no 'state_dict'); give a .ckpt file written by "
                         "`python -m lit fit`")
    return _check_class(path, checkpoint, model_class)


def _check_class(path: Path, checkpoint: dict, model_class: str | None) -> dict:
    written_by = checkpoint.get(CLASS_KEY)
    if model_class is not None and written_by is not None and written_by != model_class:
        config = path.parent.parent / "config.yaml"
        hint = f" (its config: {config})" if config.is_file() else ""
        raise ValueError(f"--ckpt_path {str(path)!r} is a checkpoint of {written_by}, but this "
                         f"config builds {model_class}: use the config the checkpoint was "
                         f"trained with{hint}")
    return checkpoint


def import_class(name: str) -> type:
    """The class a YAML ``class_path`` names (``models.ImageClassifier``: through the registry)."""
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"class_path {name!r}: give module.Class, e.g. models.ImageClassifier")
    return getattr(import_module(module), attr)


def resolve_class_path(name: str) -> str:
    """``models.ImageClassifier`` (a registry name) -> ``models.image_classifier.ImageClassifier``."""
    return class_path_of(import_class(name))


def class_path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def version_of_checkpoint(path: str | Path, logger_root: Path) -> int | str | None:
    """The logger version whose folder holds ``path`` (``<root>/version_N/checkpoints/x.ckpt``
    or ``<root>/<name>/checkpoints/x.ckpt``), or None when the checkpoint lies elsewhere."""
    path = Path(path).resolve()
    root = Path(logger_root).resolve()
    if path.parent.name != "checkpoints" or path.parent.parent.parent != root:
        return None
    folder = path.parent.parent.name
    if folder.startswith("version_") and folder[len("version_"):].isdigit():
        return int(folder[len("version_"):])
    return folder
