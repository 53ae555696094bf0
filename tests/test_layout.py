"""The package layout: imports run one way, ``lit`` <- ``datamodules`` <- ``models`` <-
``callbacks``; ``lit/`` holds the framework and one subpackage per run-driving tool; every
``class_path`` of the configs and every registry name imports.

The direction keeps the framework usable without any model, and lets a datamodule be read
without the networks that consume it: ``lit`` imports none of the other three, ``datamodules``
only ``lit``, ``models`` ``lit`` and ``datamodules``, and ``callbacks`` any of them. Imports
inside functions count as much as those at the top of a module, and so do the module paths of
a lazy registry (``_LAZY``), which are imports made on first use.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from lit.checkpoints import import_class
from tests.conftest import CONFIGS, ROOT

# What each package may import of ours (itself included).
MAY_IMPORT = {
    "lit": {"lit"},
    "datamodules": {"lit", "datamodules"},
    "models": {"lit", "datamodules", "models"},
    "callbacks": {"lit", "datamodules", "models", "callbacks"},
}
# Ours but no package's to import: the test suite, the benchmarks and the scripts.
NEVER = {"tests", "benchmarks", "scripts"}

# lit/ top level: the framework (CLI, base module, schedulers, lazy registries, checkpoint
# checks, the callbacks the CLI adds itself) ...
LIT_MODULES = {"__init__.py", "__main__.py", "cli.py", "module.py", "schedulers.py", "lazy.py",
               "checkpoints.py", "signal_checkpoint.py", "run_hparams.py"}
# ... and one subpackage per part that stands alone: optimizers and the run-driving tools.
LIT_SUBPACKAGES = {"optim", "batch_size", "scaling", "tradeoff", "energy"}

REGISTRIES = ["models", "datamodules", "callbacks", "lit.optim"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module path)``, in line order, of every import in ``source`` (the module
    ``module``), at any depth: ``import``, ``from ... import`` (relative ones resolved),
    ``import_module("...")`` with a literal name, and the values of a module-level ``_LAZY``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    getattr(node.func, "attr", None) == "import_module"
                    or getattr(node.func, "id", None) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    for node in tree.body:
        is_registry = isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
            getattr(target, "id", None) == "_LAZY" for target in node.targets)
        if is_registry:
            found += [(value.lineno, value.value) for value in node.value.values
                      if isinstance(value, ast.Constant) and isinstance(value.value, str)]
    return sorted(found)


def wrong_way(package: str, imported: str) -> bool:
    top = imported.split(".")[0]
    ours = set(MAY_IMPORT) | NEVER
    return top in ours and top not in MAY_IMPORT[package]


def package_files() -> list[Path]:
    return sorted(path for package in MAY_IMPORT for path in (ROOT / package).rglob("*.py")
                  if "__pycache__" not in path.parts)


def test_the_scan_sees_imports_at_every_depth() -> None:
    """A hand-written module with one import of each kind, three of them the wrong way."""
    source = ("import torch\n"
              "from lit.module import LitModule\n"
              "import models.dlrm.strategy\n"
              "def build():\n"
              "    from callbacks import NMPruning\n"
              "    return importlib.import_module('datamodules.ctr')\n"
              "from . import schedulers\n"
              "_LAZY = {'Adan': 'lit.optim.adan', 'Odd': 'models.odd'}\n")
    found = imported_modules(source, "lit.optim", is_package=True)
    assert found == [(1, "torch"), (2, "lit.module"), (3, "models.dlrm.strategy"),
                     (5, "callbacks"), (6, "datamodules.ctr"), (7, "lit.optim"),
                     (8, "lit.optim.adan"), (8, "models.odd")]
    assert [(line, name) for line, name in found if wrong_way("lit", name)] == [
        (3, "models.dlrm.strategy"), (5, "callbacks"), (6, "datamodules.ctr"), (8, "models.odd")]
    assert imported_modules("from ..ctr import batch\n", "datamodules.ctr.stream", False) == [
        (1, "datamodules.ctr")]
    assert not wrong_way("models", "datamodules.ctr.batch") and wrong_way("datamodules", "models")
    assert wrong_way("callbacks", "tests.conftest") and not wrong_way("callbacks", "models")


def test_imports_run_one_way() -> None:
    files = package_files()
    assert len(files) > 40, files  # the scan finds the packages
    wrong = []
    for path in files:
        module = module_name(path)
        package = module.split(".")[0]
        for line, name in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if wrong_way(package, name):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {name}")
    assert not wrong, ("imports against lit <- datamodules <- models <- callbacks (move the "
                       "shared code down to the package both may import):\n" + "\n".join(wrong))


def test_lit_holds_the_framework_and_one_subpackage_per_tool() -> None:
    modules = {p.name for p in (ROOT / "lit").iterdir() if p.is_file() and p.suffix == ".py"}
    folders = {p.name for p in (ROOT / "lit").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules - LIT_MODULES == set(), (
        "lit/ holds the framework only: put a model's code under models/, a callback under "
        "callbacks/, a tool in its own lit/ subpackage")
    assert LIT_MODULES - modules == set()  # the allow-list names what is there
    unknown = folders - LIT_SUBPACKAGES
    assert not unknown, f"lit/ folders outside the allow-list: {sorted(unknown)}"
    for folder in folders:
        assert (ROOT / "lit" / folder / "__init__.py").is_file(), f"lit/{folder} is no package"


def class_paths(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for value in node.values() for p in class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in class_paths(value)]
    return []


def configs_by_class_path() -> dict[str, list[str]]:
    """Every ``class_path`` in configs/**/*.yaml: the configs that name it."""
    out: dict[str, list[str]] = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        for name in class_paths(yaml.safe_load(path.read_text())):
            out.setdefault(name, []).append(str(path.relative_to(CONFIGS)))
    return out


CONFIG_CLASS_PATHS = configs_by_class_path()


def test_the_configs_name_classes() -> None:
    assert {"models.ImageClassifier", "models.DLRMModule", "callbacks.NMPruning"} <= set(
        CONFIG_CLASS_PATHS)


@pytest.mark.parametrize("class_path", sorted(CONFIG_CLASS_PATHS))
def test_every_config_class_path_imports(class_path: str) -> None:
    configs = sorted(set(CONFIG_CLASS_PATHS[class_path]))
    try:
        cls = import_class(class_path)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{class_path} (in {configs}) does not import: {error}")
    assert isinstance(cls, type), f"{class_path} (in {configs}) is no class"


@pytest.mark.parametrize("package", REGISTRIES)
def test_every_registry_name_imports(package: str) -> None:
    registry = importlib.import_module(package)
    assert registry._LAZY
    for name in registry._LAZY:
        assert isinstance(getattr(registry, name), type), f"{package}.{name}"
