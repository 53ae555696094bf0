"""Every dotted name of ours that the README and docs/ cite can be imported under that name."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.conftest import ROOT

PACKAGES = ("lit", "models", "datamodules", "callbacks")
# `lit.optim.Adan`, `models.dlrm.sharded.FusedDenseOptimizer`, ``callbacks.NMPruning`` ...
NAME = re.compile(r"`+((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)" % "|".join(PACKAGES))


def cited_names() -> list[str]:
    names: set[str] = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names.update(NAME.findall(page.read_text()))
    return sorted(names)


def resolve(name: str) -> object:
    """Import ``name`` as a module, or as an attribute chain after its longest module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_docs_cite_names():
    assert len(cited_names()) > 30  # the scan finds the names (a regex that matched nothing would pass)


@pytest.mark.parametrize("name", cited_names())
def test_cited_name_imports(name):
    assert resolve(name) is not None
