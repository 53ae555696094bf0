"""Interrupted and resumed runs: signals, re-planned schedules, checkpoint checks, version folders."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lit.checkpoints import META_FILE
from lit.cli import is_strategy, main, resume_command
from tests.conftest import CONFIGS, cli_args, needs_fmnist, run_lit

# A quickstart cut to seconds: 6 steps of 32 images per epoch, 2 validation batches.
SMALL = ["--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2",
         "--data.init_args.batch_size=32", "--test_after_fit=false",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class SendSignal(Callback):
    """Sends ``signum`` to this very process after optimizer step ``at_step`` (a real signal)."""

    def __init__(self, at_step: int, signum: int) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def _quickstart(tmp_path: Path, *extra: str) -> list[str]:
    return cli_args("fit", f"--config={CONFIGS / 'quickstart.yaml'}", *SMALL, *extra,
                    tmp_path=tmp_path)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _last(tmp_path: Path, version: int = 0) -> Path:
    return tmp_path / "runs" / "quickstart" / f"version_{version}" / "checkpoints" / "last.ckpt"


@needs_fmnist
@pytest.mark.parametrize("signum", [signal.SIGTERM,
                                    pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_a_checkpoint_exits_nonzero_and_resumes_to_the_same_weights(tmp_path, signum):
    straight = run_lit(_quickstart(tmp_path / "straight", "--trainer.max_epochs=2"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    stop = f"--trainer.callbacks+={{class_path: {__name__}.SendSignal, " \
           f"init_args: {{at_step: 4, signum: {int(signum)}}}}}"
    args = _quickstart(tmp_path / "cut", "--trainer.max_epochs=2")
    first = run_lit([*args, stop])
    assert first.returncode == 128 + int(signum), first.stderr[-3000:]
    ckpt = _last(tmp_path / "cut")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4  # the step the signal arrived at, not an epoch end
    out = first.stdout + first.stderr
    assert f"{signal.Signals(signum).name}: checkpoint of step 4" in out
    assert "resume with: python -m lit fit" in out and str(ckpt) in out

    resumed = run_lit([*args, f"--ckpt_path={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint: {ckpt}" in resumed.stdout + resumed.stderr  # updated, not last-v1.ckpt
    # One run in TensorBoard: the resume logged into the same version folder.
    assert sorted(p.name for p in (tmp_path / "cut" / "runs" / "quickstart").iterdir()) == ["version_0"]
    a, b = _weights(_last(tmp_path / "straight")), _weights(ckpt)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_second_signal_exits_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from lit.signal_checkpoint import SignalCheckpoint\n"
        "cb = SignalCheckpoint()\n"
        "cb.on_fit_start(None, None)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert cb.received == signal.SIGTERM\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "raise SystemExit(0)\n"
    )
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "second SIGTERM: exiting now" in proc.stderr


@needs_fmnist
def test_extending_a_finished_run_replans_the_schedule(tmp_path):
    main(_quickstart(tmp_path, "--trainer.max_epochs=1"))
    ckpt = _last(tmp_path)
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert before["lr_schedulers"][0]["total_steps"] == 6
    assert before["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    try:
        main(_quickstart(tmp_path, "--trainer.max_epochs=3", f"--ckpt_path={ckpt}"))
    finally:
        lightning_log.removeHandler(handler)
    assert any("re-planned from 6 to 18 optimizer steps" in m for m in messages)
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert after["global_step"] == 18
    assert after["lr_schedulers"][0]["total_steps"] == 18
    moved = [k for k in before["state_dict"]
             if not torch.equal(before["state_dict"][k], after["state_dict"][k])]
    assert len(moved) == len(before["state_dict"])  # every tensor trained again (lr > 0)


@needs_fmnist
def test_checkpointing_off_is_honoured(tmp_path):
    main(_quickstart(tmp_path, "--trainer.max_epochs=1", "--trainer.enable_checkpointing=false"))
    assert not list(tmp_path.rglob("*.ckpt"))


@needs_fmnist
def test_ckpt_path_checks(tmp_path, capsys):
    def rejected(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        return capsys.readouterr().err

    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    err = rejected(_quickstart(tmp_path, f"--ckpt_path={bogus}"))
    assert f"error: --ckpt_path '{bogus}' is not a readable PyTorch checkpoint" in err
    assert "weights_only=False" not in err  # no advice to run the file's code
    assert "no such file" in rejected(_quickstart(tmp_path, f"--ckpt_path={tmp_path / 'missing.ckpt'}"))
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    assert "not a Lightning checkpoint" in rejected(_quickstart(tmp_path, f"--ckpt_path={plain}"))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "lit_module_class": "models.dlrm.module.DLRMModule",
                "hyper_parameters": {"embedding_dim": 8}}, other)
    err = rejected(cli_args("test", f"--config={CONFIGS / 'quickstart.yaml'}", f"--ckpt_path={other}",
                            tmp_path=tmp_path))
    assert ("is a checkpoint of models.dlrm.module.DLRMModule, but this config builds "
            "models.image_classifier.ImageClassifier") in err


def test_sharded_folder_names_the_strategy_its_model_declares(tmp_path, capsys):
    """A DCP folder given under a strategy that cannot read it: one line naming the strategy of
    DLRMModule.sharded_checkpoint_strategy, before anything is built."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    torch.save({}, folder / META_FILE)
    with pytest.raises(SystemExit) as exit_:
        main(cli_args("validate", f"--config={CONFIGS / 'dlrm' / 'synthetic.yaml'}",
                      "--trainer.strategy=auto", f"--ckpt_path={folder}", tmp_path=tmp_path))
    assert exit_.value.code == 2
    assert (f"error: --ckpt_path '{folder}' is a sharded checkpoint (a DCP folder): load it with "
            "--trainer.strategy torchrec_ddp (any --trainer.devices, 1 included)\n"
            ) in capsys.readouterr().err


def test_a_strategy_is_known_by_name_class_path_or_instance():
    from jsonargparse import Namespace
    from lightning.pytorch.strategies import DDPStrategy

    from models.dlrm.strategy import TorchrecDDPStrategy

    name = "torchrec_ddp"
    assert is_strategy(name, name)
    assert is_strategy(Namespace(class_path="models.dlrm.strategy.TorchrecDDPStrategy",
                                 init_args=Namespace(state_dict_type="full")), name)
    assert is_strategy({"class_path": "models.dlrm.strategy.TorchrecDDPStrategy"}, name)
    assert is_strategy(TorchrecDDPStrategy(), name)
    for other in ("ddp", "auto", None, DDPStrategy(),
                  {"class_path": "lightning.pytorch.strategies.DDPStrategy"},
                  {"class_path": "models.dlrm.strategy.NoSuchStrategy"}):
        assert not is_strategy(other, name), other


def test_resume_command_replaces_the_checkpoint():
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--trainer.max_epochs=3"]
    assert resume_command(argv, "runs/x/last.ckpt") == (
        "python -m lit fit --config 'a b.yaml' --trainer.max_epochs=3 --ckpt_path runs/x/last.ckpt")



@pytest.mark.slow
def test_dlrm_single_epoch_sigterm_resumes_exactly_once_to_the_same_weights(tmp_path):
    small = ["--data.init_args.batch_size=256", "--data.init_args.train_samples=4096",
             "--data.init_args.val_samples=512", "--data.init_args.test_samples=512",
             "--data.init_args.max_cardinality=1000", "--model.init_args.num_embeddings=1000",
             "--model.init_args.embedding_dim=8", "--model.init_args.dense_arch_layer_sizes=[16]",
             "--model.init_args.over_arch_layer_sizes=[16]", "--test_after_fit=false",
             "--trainer.callbacks=[{class_path: callbacks.EvalAtSamples, "
             "init_args: {at_samples: [1024, 4096]}}]", "--trainer.enable_progress_bar=false"]

    def args(root: Path) -> list[str]:
        return cli_args("fit", f"--config={CONFIGS / 'dlrm' / 'synthetic.yaml'}", *small,
                        tmp_path=root)

    def last(root: Path) -> Path:
        return root / "runs" / "dlrm_synthetic" / "version_0" / "checkpoints" / "last.ckpt"

    straight = run_lit(args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    stop = f"--trainer.callbacks+={{class_path: {__name__}.SendSignal, " \
           f"init_args: {{at_step: 5, signum: {int(signal.SIGTERM)}}}}}"
    first = run_lit([*args(tmp_path / "cut"), stop])
    assert first.returncode == 143, first.stderr[-3000:]
    ckpt = last(tmp_path / "cut")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["samples_seen"] == 5 * 256
    resumed = run_lit([*args(tmp_path / "cut"), f"--ckpt_path={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(last(tmp_path / "straight"), map_location="cpu", weights_only=True)
    b = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert a["samples_seen"] == b["samples_seen"] == 4096  # each sample once across the stop
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0,
                                   msg=key)
