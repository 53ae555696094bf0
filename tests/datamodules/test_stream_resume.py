"""Mid-epoch resume of the CTR streams: a single-epoch run interrupted after k steps and resumed
from its checkpoint trains on every sample exactly once in total."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.ctr.sharding import Reader, batches_for_reader, num_global_batches
from datamodules.ctr.stream import BatchStream, StreamLoader
from datamodules.ctr.synthetic import SyntheticCTR

SMALL = dict(cardinalities=[50, 1000, 3], num_dense=4, val_samples=512, test_samples=512)


class Logistic(LightningModule):
    """Logistic regression on the dense features: enough to step an optimizer on CTR batches."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        logits = self.linear(batch.dense_features).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Crash(Exception):
    """The interruption: raised inside the training loop, like a failure of the process."""


class Record(Callback):
    """Records the sample indices of each trained batch; raises :class:`Crash` before batch
    ``stop_at``, after the checkpoint of the batch before was written."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.seen = stop_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.stop_at:
            raise Crash

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch.indices.tolist())


def fit(dm, tmp_path, record, ckpt_path=None, every=None):
    """Fit ``Logistic`` for one epoch; with ``every``, checkpoint every that many steps and
    expect ``record`` to interrupt the run."""
    callbacks = [record]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                         save_top_k=-1))
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path)
    model = Logistic()
    if every:
        with pytest.raises(Crash):
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_single_epoch_run_sees_each_sample_once(tmp_path, workers):
    batch, steps, k = 64, 11, 4
    make = lambda: SyntheticCTR(batch_size=batch, train_samples=batch * steps + 30,  # noqa: E731
                                num_workers=workers, **SMALL)
    first = Record(stop_at=k)
    fit(make(), tmp_path, first, every=k)
    assert len(first.seen) == k
    ckpt = tmp_path / "ckpt" / f"epoch=0-step={k}.ckpt"
    second = Record()
    trainer, _ = fit(make(), tmp_path, second, ckpt_path=ckpt)
    assert len(second.seen) == steps - k and trainer.global_step == steps
    seen = [i for b in first.seen + second.seen for i in b]
    assert sorted(seen) == list(range(batch * steps))  # exactly once, the ragged tail dropped
    assert second.seen[0][0] == k * batch  # the stream continued at the next unseen sample


def test_resumed_run_ends_at_the_weights_of_an_uninterrupted_one(tmp_path):
    make = lambda: SyntheticCTR(batch_size=32, train_samples=32 * 9, **SMALL)  # noqa: E731
    torch.manual_seed(0)
    _, straight = fit(make(), tmp_path / "a", Record())
    torch.manual_seed(0)
    fit(make(), tmp_path / "b", Record(stop_at=5), every=5)
    _, resumed = fit(make(), tmp_path / "b", Record(), ckpt_path=tmp_path / "b" / "ckpt" / "epoch=0-step=5.ckpt")
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("world,workers,done", [(1, 3, 2), (2, 2, 3), (3, 2, 1)])
def test_sharding_from_a_resume_point_completes_the_epoch(world, workers, done):
    """Hand-worked: after ``done`` batches on each of ``world`` ranks, the readers of all ranks
    and workers read exactly the global batches not yet read, in increasing order per rank."""
    count = num_global_batches(27 * 10 + 5, 10, world, drop_last=True)
    first = done * world
    read = []
    for rank in range(world):
        per_rank = []
        for worker in range(workers):
            reader = Reader(index=worker * world + rank, count=world * workers, world_size=world)
            per_rank.append(list(batches_for_reader(count, reader, first)))
        # The DataLoader takes its workers' batches in turn: rank r reads r + world * j in order.
        interleaved = [b for group in zip(*[p + [None] for p in per_rank]) for b in group if b is not None]
        assert interleaved == list(range(first + rank, count, world))
        read += interleaved
    assert sorted(read) == list(range(first, count))
    assert (count - first) % world == 0  # equal steps on every rank after the resume


def test_checkpoint_from_other_world_size_is_refused():
    dm = SyntheticCTR(batch_size=16, train_samples=160, **SMALL)
    loader = dm.train_dataloader()
    with pytest.raises(ValueError, match="written mid-epoch on 2 devices"):
        loader.load_state_dict({"epoch": 0, "batches": 3, "world_size": 2})
    loader.load_state_dict({"epoch": 0, "batches": 3, "world_size": 1})
    assert next(iter(loader)).indices.tolist() == list(range(48, 64))
    assert next(iter(loader)).indices.tolist() == list(range(16))  # the next epoch starts at 0


def test_dlrm_single_epoch_interrupted_and_resumed_equals_a_straight_run(tmp_path):
    """The recipe this serves: DLRMModule (fused row-wise Adagrad, progressive loss, samples
    seen) on the single-epoch stream, interrupted after 4 of 9 steps."""
    import lightning as L

    from models.dlrm.module import DLRMModule
    from models.dlrm.sharded import to_plain

    tiny = dict(embedding_dim=4, num_embeddings=8, dense_arch_layer_sizes=[6], over_arch_layer_sizes=[5])
    small = dict(cardinalities=[30, 200, 5], num_dense=3, val_samples=256, test_samples=256)

    def run(root, record, ckpt_path=None, every=None):
        callbacks = [record] + ([ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every,
                                                 save_top_k=-1)] if every else [])
        trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                          default_root_dir=root)
        model = DLRMModule(**tiny, optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
        dm = SyntheticCTR(batch_size=64, train_samples=64 * 9, **small)
        if every:
            with pytest.raises(Crash):
                trainer.fit(model, dm)
        else:
            trainer.fit(model, dm, ckpt_path=ckpt_path)
        return trainer, model

    L.seed_everything(0)
    straight_trainer, straight = run(tmp_path / "a", Record())
    L.seed_everything(0)
    first, second = Record(stop_at=4), Record()
    run(tmp_path / "b", first, every=4)
    L.seed_everything(1)  # other initial weights: everything must come from the checkpoint
    trainer, resumed = run(tmp_path / "b", second, ckpt_path=tmp_path / "b" / "ckpt" / "epoch=0-step=4.ckpt")
    assert sorted(i for b in first.seen + second.seen for i in b) == list(range(64 * 9))
    a, b = to_plain(straight.model.state_dict()), to_plain(resumed.model.state_dict())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed.samples_seen == straight.samples_seen == 64 * 9
    assert float(trainer.callback_metrics["train/progressive_loss"]) == pytest.approx(
        float(straight_trainer.callback_metrics["train/progressive_loss"]), rel=1e-6)


class ShuffledStream(LightningDataModule):
    """A shuffled BatchStream of dense-only batches (MovieLens-style per-epoch shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        self.source = SyntheticCTR(batch_size=32, train_samples=32 * 4, **SMALL).source("train")

    def train_dataloader(self):
        return StreamLoader(BatchStream(32 * 4, 32, self.source, shuffle_seed=5), 0, self.trainer)


def test_resume_from_an_epoch_end_checkpoint_takes_the_next_epochs_shuffle(tmp_path):
    def run(root, epochs, record, ckpt_path=None):
        trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True)],
                          default_root_dir=root)
        trainer.fit(Logistic(), datamodule=ShuffledStream(), ckpt_path=ckpt_path)

    straight, first, second = Record(), Record(), Record()
    run(tmp_path / "a", 3, straight)
    run(tmp_path / "b", 2, first)
    run(tmp_path / "b", 3, second, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert len(second.seen) == 4 and straight.seen[8:] != straight.seen[4:8]
    assert first.seen + second.seen == straight.seen
