"""The lazy registries: every entry resolves to the class it names, every public Callback,
LightningModule and optimizer defined in its package is registered, unknown names fail."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = ["models", "datamodules", "callbacks", "lit.optim"]
ROOT = Path(__file__).resolve().parents[2]
# Base classes (by name) that make a class something YAML selects by ``package.Name``.
KINDS = {"callbacks": {"Callback"}, "models": {"LightningModule", "LitModule"}, "lit.optim": {"Optimizer"}}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_registry_entry_resolves(package: str) -> None:
    module = importlib.import_module(package)
    for name, module_path in module._LAZY.items():
        cls = getattr(module, name)
        assert cls.__name__ == name and cls.__module__ == module_path


def leaf_classes(package: str, kinds: set[str]) -> dict[str, str]:
    """Public module-level classes of ``package`` deriving (also through each other) from
    ``kinds`` and not themselves a base of another such class: ``{name: module path}``."""
    classes: dict[str, tuple[str, list[str]]] = {}
    for path in (ROOT / package.replace(".", "/")).rglob("*.py"):
        module_path = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                classes[node.name] = (module_path, bases)
    found = set(kinds)
    while True:
        more = {name for name, (_, bases) in classes.items() if set(bases) & found} - found
        if not more:
            break
        found |= more
    used_as_base = {b for _, bases in classes.values() for b in bases}
    return {name: classes[name][0] for name in found - kinds
            if not name.startswith("_") and name not in used_as_base}


@pytest.mark.parametrize("package", sorted(KINDS))
def test_every_public_class_of_its_kind_is_registered(package: str) -> None:
    registry = importlib.import_module(package)._LAZY
    leaves = leaf_classes(package, KINDS[package])
    assert leaves, f"no {KINDS[package]} found in {package}: the scan is broken"
    missing = {name: path for name, path in leaves.items() if registry.get(name) != path}
    assert not missing, f"add these to {package}/__init__.py's _LAZY: {missing}"


def test_a_base_class_is_not_required_in_the_registry() -> None:
    leaves = leaf_classes("models", KINDS["models"])
    assert "ClassifierModule" not in leaves  # the base of ImageClassifier and BertClassifier
    assert {"ImageClassifier", "BertClassifier"} <= set(leaves)


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_name_is_an_attribute_error(package: str) -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        getattr(importlib.import_module(package), "NoSuchThing")
