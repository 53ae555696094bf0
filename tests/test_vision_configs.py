"""Every configs/vision/*.yaml builds its model through the CLI; one fast_dev_run per config family
(ImageNet-style DeiT and Swin on a real image folder, Fashion-MNIST) with tiny CLI overrides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.models.swin_transformer import SwinTransformer

from lit.cli import LitCLI, main
from models.image_classifier import ImageClassifier
from models.patch_dropout import PatchDropout
from models.swin_patch_dropout import PatchDropoutSwinTransformer, SwinPatchDropout
from tests.conftest import CONFIGS, needs_fmnist

VISION = sorted((CONFIGS / "vision").glob("*.yaml"))


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_configs_for_each_family() -> None:
    names = {p.stem for p in VISION}
    assert {"deit_tiny_patchdropout_224", "deit_small_patchdropout_224", "deit_base_patchdropout_224",
            "swin_tiny_patchdropout_224", "deit_small_patchdropout_448", "swin_tiny_patchdropout_448",
            "fmnist_deit_tiny_patchdropout", "fmnist_swin_tiny_patchdropout",
            "deit_base_patchdropout_224_compiled"} <= names


@pytest.mark.parametrize("config", VISION, ids=lambda p: p.stem)
def test_config_builds_its_model_with_patch_dropout_on(config) -> None:
    """The CLI builds each config's model, datamodule and trainer (weights on the meta device:
    no memory, no init time); the installed layer carries the config's keep rate."""
    with torch.device("meta"):
        cli = LitCLI(args=["--config", str(config), "--trainer.logger=false"], run=False)
    options = yaml.safe_load(config.read_text())["model"]["init_args"]
    backbone, layer = cli.model.backbone, cli.model.backbone.patch_drop
    assert isinstance(cli.model, ImageClassifier)
    if isinstance(backbone, SwinTransformer):
        assert isinstance(backbone, PatchDropoutSwinTransformer) and isinstance(layer, SwinPatchDropout)
    else:
        assert isinstance(layer, PatchDropout) and layer.ordered == options.get("ordered", True)
    assert layer.keep_rate == options["keep_rate"]
    assert layer.schedule == options.get("keep_rate_schedule", "fixed")
    assert layer.keep_rate < 1 or layer.schedule == "random"  # PatchDropout is on
    size = options.get("img_size") or 28
    assert cli.model.example_input_array.shape[-2:] == (size, size)
    if hasattr(cli.datamodule, "image_size"):
        assert cli.datamodule.image_size == size


def test_presizer_is_expressible_in_yaml(tmp_path, capsys) -> None:
    extra = tmp_path / "presize.yaml"
    extra.write_text(yaml.safe_dump({"data": {"init_args": {"pre_transforms": [
        {"class_path": "datamodules.presize.ConviformerPresize", "init_args": {"border": 20}}]}}}))
    parsed = print_config(capsys, "--config", str(CONFIGS / "vision" / "deit_small_patchdropout_224.yaml"),
                          "--config", str(extra))
    transform = parsed["data"]["init_args"]["pre_transforms"][0]
    assert transform["class_path"] == "datamodules.presize.ConviformerPresize"
    assert transform["init_args"]["border"] == 20


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_like")
    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg")
        for split in ("train", "val"):
            (root / split / name).mkdir(parents=True)
            for i, (h, w) in enumerate([(80, 60), (60, 150), (100, 100), (50, 90)]):
                Image.fromarray(np.ascontiguousarray(photo[10 * i:10 * i + h, 20 * i:20 * i + w])).save(
                    root / split / name / f"{i}.jpg")
    return root


def tiny_run(tmp_path, config: str, *overrides: str):
    return main(["fit", "--config", str(CONFIGS / "vision" / config),
                 f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                 *overrides])


@pytest.mark.parametrize("config, backbone, size, tokens, extra", [
    ("deit_small_patchdropout_224.yaml", "deit_fmnist_tiny_patch4_28", 16, 8, ()),  # 16 patches, keep 0.5
    ("swin_tiny_patchdropout_224.yaml", "swin_fmnist_tiny_patch2_window7_28", 28, 36, ()),  # n = 3 of 7
    # compile: true from the YAML; the trace-only backend keeps it a CPU test of a few seconds
    ("deit_base_patchdropout_224_compiled.yaml", "deit_fmnist_tiny_patch4_28", 16, 8,
     ("--model.init_args.compile_backend=eager",)),
])
def test_imagefolder_family_trains(tmp_path, photo_folder, config, backbone, size, tokens, extra) -> None:
    cli = tiny_run(tmp_path, config, *extra, f"--model.init_args.backbone={backbone}",
                   f"--model.init_args.img_size={size}", "--model.init_args.num_classes=2",
                   "--model.init_args.in_chans=3",
                   f"--data.init_args.data_dir={photo_folder}", f"--data.init_args.image_size={size}",
                   "--data.init_args.batch_size=4", "--data.init_args.num_workers=0")
    layer = cli.model.backbone.patch_drop  # what the training step used
    kept = layer.last_stage_tokens[0] if "swin" in backbone else layer.last_tokens
    assert kept == tokens and layer.last_keep_rate == 0.5
    assert np.isfinite(cli.trainer.callback_metrics["test/loss"].item())  # fit, then test
    assert cli.model.compiled == ("compiled" in config)


@needs_fmnist
def test_fmnist_family_trains(tmp_path) -> None:
    cli = tiny_run(tmp_path, "fmnist_deit_tiny_patchdropout.yaml", "--data.init_args.batch_size=8",
                   "--test_after_fit=false")
    metrics = cli.trainer.callback_metrics  # the training step logs what it kept
    assert metrics["train/tokens_kept"].item() == 24  # int(49 * 0.5)
    assert metrics["train/keep_rate"].item() == 0.5
    assert "val/acc" in metrics
