"""What a run shows a user: one readable hparams entry, clear messages, no third-party noise."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from lit.cli import main
from lit.run_hparams import flat_hparams
from tests.conftest import CONFIGS, cli_args, needs_fmnist, run_lit


def test_flat_hparams_by_hand():
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 3, "precision": "32-true", "callbacks": [{"x": 1}]},
        "model": {"class_path": "models.ImageClassifier", "init_args": {
            "backbone": "deit_tiny", "keep_rate": 0.5, "_instantiator": "internal",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002}},
            "lr_scheduler": {"class_path": "lit.schedulers.WarmupDecay",
                             "init_args": {"warmup_fraction": 0.05}}}},
        "optimizer": {"class_path": "lit.optim.Adan", "init_args": {"lr": 0.01}},  # wins
        "data": {"class_path": "datamodules.FashionMNIST", "init_args": {"batch_size": 128}},
    }
    flat = flat_hparams(config)
    assert flat["optimizer"] == "Adan" and flat["optimizer/lr"] == 0.01
    assert flat["lr_scheduler"] == "WarmupDecay" and flat["lr_scheduler/warmup_fraction"] == 0.05
    assert flat["model"] == "ImageClassifier" and flat["model/backbone"] == "deit_tiny"
    assert flat["data/batch_size"] == 128 and flat["trainer/max_epochs"] == 3 and flat["seed"] == 0
    assert not any("_instantiator" in key or "callbacks" in key for key in flat)


def _hparams_sessions(log_dir: Path) -> list[dict]:
    sessions = []
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
                    sessions.append({k: v.ListFields()[0][1] if v.ListFields() else None
                                     for k, v in data.session_start_info.hparams.items()})
    return sessions


@needs_fmnist
def test_one_hparams_session_with_optimizer_backbone_and_length(tmp_path):
    main(cli_args("fit", f"--config={CONFIGS / 'quickstart.yaml'}", "--trainer.max_epochs=1",
                  "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                  "--test_after_fit=false", "--optimizer=SGD", "--optimizer.lr=0.05",
                  tmp_path=tmp_path))
    sessions = _hparams_sessions(tmp_path / "runs" / "quickstart" / "version_0")
    assert len(sessions) == 1
    hp = sessions[0]
    assert hp["optimizer"] == "SGD" and hp["optimizer/lr"] == pytest.approx(0.05)
    assert hp["model/backbone"] == "deit_fmnist_tiny_patch4_28"
    assert hp["trainer/max_epochs"] == 1 and hp["lr_scheduler"] == "WarmupDecay"
    assert not any(key.startswith("_") or "/_" in key for key in hp)


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\nmodel: x\n")
    proc = run_lit(["fit", f"--config={bad}"])
    assert proc.returncode == 2
    assert f"--config {bad}: line 3, column 6: YAML syntax error" in proc.stderr
    assert "<unicode string>" not in proc.stderr


def test_help_for_a_model_lists_its_arguments():
    proc = run_lit(["fit", "--model", "models.ImageClassifier", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--model.keep_rate" in proc.stdout and "--trainer.max_epochs" not in proc.stdout


def test_dlrm_run_prints_no_third_party_noise(tmp_path):
    proc = run_lit(cli_args("fit", f"--config={CONFIGS / 'dlrm' / 'movielens.yaml'}",
                            "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                            "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
                            "--trainer.log_every_n_steps=1", tmp_path=tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in ("otherwise, the job will fail", "sync_dist=True", "HeuristicalStorageReservation",
                  "deprecating ShardedTensor", "litlogger", "is_fx_tracing", "Total FLOPs: 0"):
        assert noise not in out, noise
    assert "Total FLOPs" in out  # the summary is still there, with a count
    log_dir = tmp_path / "runs" / "dlrm_movielens" / "version_0"
    sessions = _hparams_sessions(log_dir)
    assert len(sessions) == 1 and sessions[0]["embedding_parameters"] > 0
    tags = {value.tag for events in log_dir.glob("events.out.tfevents.*")
            for event in EventFileLoader(str(events)).Load() for value in event.summary.value}
    assert "train/samples_per_s" in tags
