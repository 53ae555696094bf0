"""BatchSizeTarget inside a real Trainer: stops at the target, stops past the cost limit,
records a run that runs out of epochs, prices energy with Zeus's cost, writes its result
atomically, and rejects bad arguments."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from callbacks.batch_size_target import BatchSizeTarget, write_json_atomic
from lit.energy.fake import FakeNVML, h200_like_profile


class ScriptedAccuracy(L.LightningModule):
    """A tiny linear model whose logged ``val/acc`` follows a script, one value per validation,
    and whose training steps take ``step_s`` seconds (so time costs are predictable)."""

    def __init__(self, accuracies: list[float], step_s: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.accuracies, self.step_s, self.validations = accuracies, step_s, 0

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("val/acc", self.accuracies[min(self.validations, len(self.accuracies) - 1)])
            self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g)),
                      batch_size=10)  # 4 steps per epoch


def fit(tmp_path, model, callback, *extra: Callback, max_epochs: int = 5) -> L.Trainer:
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[callback, *extra], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(model, loader(), loader())
    return trainer


def test_stops_at_the_target_and_writes_the_result(tmp_path) -> None:
    out = tmp_path / "res" / "run.json"
    cb = BatchSizeTarget("val/acc", 0.8, result_path=str(out))
    trainer = fit(tmp_path, ScriptedAccuracy([0.5, 0.7, 0.81, 0.9]), cb)
    assert trainer.current_epoch == 3 and trainer.global_step == 12  # third validation met it
    result = json.loads(out.read_text())
    assert result["status"] == "reached" and result["reached"] is True
    assert result["metric"] == pytest.approx(0.81) and result["epochs"] == 3.0
    assert result["cost_unit"] == "s" and result["cost"] == result["time_s"]
    assert [p.name for p in out.parent.iterdir()] == ["run.json"]  # no temporary file left


def test_min_mode_and_running_out_of_epochs(tmp_path) -> None:
    out = tmp_path / "run.json"
    fit(tmp_path, ScriptedAccuracy([0.5, 0.4]), BatchSizeTarget("val/acc", 0.45, mode="min",
                                                               result_path=str(out)))
    assert json.loads(out.read_text())["epochs"] == 2.0
    fit(tmp_path, ScriptedAccuracy([0.5]), BatchSizeTarget("val/acc", 0.9, result_path=str(out)),
        max_epochs=2)
    result = json.loads(out.read_text())
    assert (result["status"], result["reached"], result["epochs"]) == ("not_reached", False, 2.0)


def test_stops_early_past_the_cost_limit(tmp_path) -> None:
    out = tmp_path / "run.json"
    cb = BatchSizeTarget("val/acc", 0.99, result_path=str(out), cost_limit=0.25)
    trainer = fit(tmp_path, ScriptedAccuracy([0.5], step_s=0.05), cb, max_epochs=20)
    result = json.loads(out.read_text())
    assert result["status"] == "stopped" and not result["reached"]
    # 0.05 s a step: the limit passes within a few steps, far before 20 epochs x 4 steps
    assert 0.25 < result["cost"] < 1.0 and trainer.global_step <= 12


class StepFakeGPU(Callback):
    """Advances a fake NVML by one simulated training step per batch (nothing touches a GPU)."""

    def __init__(self, nvml: FakeNVML) -> None:
        self.nvml = nvml

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.nvml.step()


def test_energy_enters_zeus_cost(tmp_path) -> None:
    out = tmp_path / "run.json"
    nvml = FakeNVML(h200_like_profile(demand_w=675.0, step_time_s=0.1))  # limit 700 W: 675 W
    cb = BatchSizeTarget("val/acc", 0.6, result_path=str(out), eta=0.25)
    cb.nvml = nvml
    fit(tmp_path, ScriptedAccuracy([0.5, 0.7]), StepFakeGPU(nvml), cb)
    r = json.loads(out.read_text())
    # reached at the 2nd validation, after 2 epochs x 4 steps of 0.1 s at 675 W
    assert r["cost_unit"] == "J" and r["energy_j"] == pytest.approx(8 * 0.1 * 675.0)
    assert r["max_power_w"] == 700  # the fake's highest limit, one process
    assert r["cost"] == pytest.approx(0.25 * 540.0 + 0.75 * 700 * r["time_s"])


def test_time_only_when_energy_is_off(tmp_path) -> None:
    out = tmp_path / "run.json"
    cb = BatchSizeTarget("val/acc", 0.6, result_path=str(out), measure_energy=False)
    cb.nvml = FakeNVML(h200_like_profile())
    fit(tmp_path, ScriptedAccuracy([0.7]), cb)
    r = json.loads(out.read_text())
    assert (r["cost_unit"], r["energy_j"], r["cost"]) == ("s", None, r["time_s"])


def test_missing_monitor_names_what_was_logged(tmp_path) -> None:
    with pytest.raises(ValueError, match="monitor 'val/f1' was not logged.*val/acc"):
        fit(tmp_path, ScriptedAccuracy([0.5]), BatchSizeTarget("val/f1", 0.5))


def test_atomic_write_replaces_whole_files(tmp_path) -> None:
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [2, 3]})
    assert json.loads(path.read_text()) == {"b": [2, 3]} and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(TypeError):
        write_json_atomic(path, {"c": object()})  # a failed write leaves the old file intact
    assert json.loads(path.read_text()) == {"b": [2, 3]} and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "maximum"}, "mode must be"), ({"target": float("nan")}, "target must be"),
    ({"cost_limit": 0.0}, "cost_limit must be"), ({"eta": -0.1}, "eta must be in"),
    ({"max_power_w": -5.0}, "max_power_w must be"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BatchSizeTarget(**kwargs)
