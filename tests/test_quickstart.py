"""The quickstart end to end on real Fashion-MNIST: fast_dev_run, a short real run that writes
TensorBoard logs and a checkpoint and says where, resuming from it, and CPU DDP on 2 processes."""

from __future__ import annotations

from pathlib import Path

import torch

from lit.cli import main
from tests.conftest import CONFIGS, needs_fmnist, run_lit

QUICKSTART = str(CONFIGS / "quickstart.yaml")


@needs_fmnist
def test_fast_dev_run_trains_validates_and_tests(tmp_path: Path) -> None:
    cli = main(["fit", "--config", QUICKSTART, "--trainer.fast_dev_run=2",
                f"--trainer.default_root_dir={tmp_path}"])
    trainer = cli.trainer
    assert trainer.global_step == 2
    assert "test/acc" in trainer.callback_metrics  # fit ended with a test pass
    assert torch.isfinite(trainer.callback_metrics["test/loss"])


@needs_fmnist
def test_short_run_writes_logs_and_checkpoint_and_resumes(tmp_path: Path) -> None:
    common = ["--config", QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2",
              "--trainer.limit_test_batches=2", "--trainer.log_every_n_steps=2"]
    proc = run_lit(["fit", *common, "--trainer.max_epochs=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "quickstart" / "version_0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file()  # the exact config, saved beside the logs
    output = proc.stdout + proc.stderr
    assert f"TensorBoard logs: {run_dir}" in output and f"checkpoint: {checkpoint}" in output

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["epoch"] == 0
    proc = run_lit(["fit", *common, "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The resume logs into the same version folder and updates its last.ckpt.
    resumed = torch.load(checkpoint,
                         map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 12 and resumed["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "quickstart").iterdir()) == ["version_0"]

    # The other subcommands load the checkpoint: validate, test and predict.
    for subcommand in ("validate", "test", "predict"):
        limit = {"validate": "limit_val_batches", "test": "limit_test_batches",
                 "predict": "limit_predict_batches"}[subcommand]
        cli = main([subcommand, "--config", QUICKSTART, f"--ckpt_path={checkpoint}",
                    f"--trainer.{limit}=2", "--trainer.logger=false",
                    f"--trainer.default_root_dir={tmp_path / subcommand}"])
        if subcommand == "predict":
            predictions = torch.cat(cli.trainer.predict_loop.predictions)
            assert predictions.shape == (2 * 128,) and predictions.max() < 10
        else:
            assert f"{'val' if subcommand == 'validate' else 'test'}/acc" in cli.trainer.callback_metrics


@needs_fmnist
def test_cpu_ddp_two_processes(tmp_path: Path) -> None:
    proc = run_lit(["fit", "--config", QUICKSTART, "--trainer.strategy=ddp",
                    "--trainer.devices=2", "--trainer.accelerator=cpu",
                    f"--trainer.logger.init_args.save_dir={tmp_path}",
                    "--trainer.max_steps=3", "--trainer.limit_val_batches=2",
                    "--trainer.limit_test_batches=2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    checkpoint = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    # Rank-zero logging: exactly one run directory, one events file.
    assert len(list((tmp_path / "quickstart").iterdir())) == 1
