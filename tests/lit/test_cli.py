"""The CLI: every config parses, bad input is rejected by name, optimizers are selectable,
`--print_config` round-trips, and `--help` does not import the heavy libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit.cli import main
from tests.conftest import CONFIGS, ROOT, run_lit

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def config_kind(path: Path) -> str:
    """``sweep`` (a ``python -m lit.scaling`` grid over a base config), ``overlay`` (added to a
    recipe with a second ``--config``: no model of its own) or ``recipe``."""
    data = yaml.safe_load(path.read_text()) or {}
    if "base_config" in data:
        return "sweep"
    return "recipe" if "model" in data else "overlay"


RECIPES = [p for p in ALL_CONFIGS if config_kind(p) == "recipe"]
OVERLAYS = [p for p in ALL_CONFIGS if config_kind(p) == "overlay"]
# The recipe each overlay is documented with (its header's command).
OVERLAY_BASE = {"bert/int8_eval.yaml": "bert/minilm_dense.yaml",
                "bert/sparse24_inference.yaml": "bert/minilm_2to4_oneshot.yaml"}


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses_through_the_cli(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"]
    assert printed["data"]["class_path"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_overlay_parses_on_its_recipe(overlay: Path, capsys) -> None:
    base = OVERLAY_BASE[str(overlay.relative_to(CONFIGS))]
    assert base in overlay.read_text()  # the overlay's header names the recipe it goes with
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(CONFIGS / base), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"]


def test_print_config_round_trips(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    first = capsys.readouterr().out
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(dumped), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(first)


def test_repeated_config_later_file_wins(tmp_path: Path, capsys) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  max_epochs: 2\ndata:\n  init_args:\n    batch_size: 32\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(override),
              "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_epochs"] == 2
    assert cfg["data"]["init_args"]["batch_size"] == 32
    assert cfg["model"]["init_args"]["backbone"] == "deit_fmnist_tiny_patch4_28"


def test_top_level_optimizer_and_scheduler_shortcuts(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--optimizer", "SGD",
              "--optimizer.lr", "0.05", "--lr_scheduler", "StepLR",
              "--lr_scheduler.step_size", "3", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optimizer"]["class_path"] == "torch.optim.SGD"
    assert cfg["optimizer"]["init_args"]["lr"] == 0.05
    assert cfg["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"


def test_shortcut_optimizer_reaches_the_model(tmp_path: Path) -> None:
    """`--optimizer SGD` replaces the YAML's AdamW and the model keeps its own param groups."""
    cli = main(["fit", "--config", str(CONFIGS / "quickstart.yaml"),
                "--optimizer", "SGD", "--optimizer.lr", "0.05", "--optimizer.momentum", "0.9",
                "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "3",
                "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
                f"--trainer.default_root_dir={tmp_path}"])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, __import__("torch").optim.SGD)
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["momentum"] == 0.9
    # Norm weights and biases stay in the no-decay group chosen by the model.
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler).__name__ == "StepLR"


@pytest.mark.parametrize(
    ("argument", "named"),
    [
        (["--model.init_args.no_such_arg", "1"], "no_such_arg"),
        (["--data.init_args.batch_size", "lots"], "batch_size"),
        (["--trainer.max_epochs", "ten"], "max_epochs"),
    ],
)
def test_bad_keys_and_types_are_rejected_by_name(argument, named, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *argument, "--print_config"])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err


def test_unknown_key_in_yaml_is_rejected(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    cfg["model"]["init_args"]["keep_rat"] = 0.5  # typo
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad), "--print_config"])
    assert "keep_rat" in capsys.readouterr().err


def test_help_is_quick_and_imports_no_heavy_library() -> None:
    # transformers is left out: Lightning imports torchmetrics.functional, whose BERTScore module
    # imports transformers whenever it is installed. Our own packages import none of these.
    code = ("import sys, runpy; sys.argv=['lit','--help']\n"
            "try:\n    runpy.run_module('lit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('timm','torchrec','fbgemm_gpu') if m in sys.modules]\n"
            "ours=[m for m in sys.modules if m.split('.')[0] in ('models','datamodules','callbacks')"
            " and '.' in m]\n"
            "print('HEAVY', heavy, 'OURS', ours)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] OURS []" in proc.stdout


def test_a_models_strategy_is_registered_by_its_module_not_by_the_cli() -> None:
    """The CLI names no model: ``torchrec_ddp`` exists once ``models.DLRMModule`` is resolved
    (as the CLI does for the config's model before it builds the Trainer), not before."""
    code = ("from lightning.pytorch.strategies import StrategyRegistry\n"
            "import lit.cli, models\n"
            "before = 'torchrec_ddp' in StrategyRegistry\n"
            "cls = models.DLRMModule\n"
            "strategy = StrategyRegistry.get(cls.ddp_strategy)\n"
            "print('BEFORE', before, 'AFTER', type(strategy).__name__, cls.sharded_checkpoint_strategy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "BEFORE False AFTER TorchrecDDPStrategy torchrec_ddp" in proc.stdout


def test_missing_data_directory_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    proc = run_lit(["fit", "--config", str(CONFIGS / "quickstart.yaml"),
                    f"--data.init_args.data_dir={tmp_path / 'nowhere'}",
                    "--trainer.fast_dev_run=1", "--trainer.logger=false"])
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "apt-get install dataset-fashion-mnist" in proc.stderr


def test_bad_model_value_names_the_field(capsys) -> None:
    with pytest.raises(ValueError, match="keep_rate"):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"),
              "--model.init_args.keep_rate", "1.5", "--trainer.logger", "false"])


def test_short_optimizer_names_stay_torchs_after_torchrec_is_imported(capsys) -> None:
    """torchrec.optim also defines SGD/Adam/Adagrad: short names must still mean torch's."""
    import torchrec.optim  # noqa: F401

    from lit.cli import qualify_short_names

    assert qualify_short_names(["fit", "--optimizer", "SGD", "--lr_scheduler=StepLR"]) == [
        "fit", "--optimizer", "torch.optim.SGD", "--lr_scheduler=torch.optim.lr_scheduler.StepLR"]
    assert qualify_short_names(["--optimizer", "Adan", "--lr_scheduler", "WarmupDecay"]) == [
        "--optimizer", "lit.optim.Adan", "--lr_scheduler", "lit.schedulers.WarmupDecay"]
    assert qualify_short_names(["--optimizer", "my.pkg.Opt", "--optimizer.lr", "0.1"]) == [
        "--optimizer", "my.pkg.Opt", "--optimizer.lr", "0.1"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--optimizer", "Adagrad",
              "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["optimizer"]["class_path"] == "torch.optim.Adagrad"
