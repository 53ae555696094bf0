"""The lazy registries: every entry resolves to the class it names, unknown names fail."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["models", "datamodules", "callbacks", "lit.optim"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_registry_entry_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module._LAZY)
    for name, module_path in module._LAZY.items():
        cls = getattr(module, name)
        assert cls.__name__ == name and cls.__module__ == module_path


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_name_is_an_attribute_error(package: str) -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        getattr(importlib.import_module(package), "NoSuchThing")
