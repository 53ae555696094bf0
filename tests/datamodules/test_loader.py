"""The shared loader: split-size checks, and a map-style training order that resumes mid-epoch
(a run interrupted mid-epoch and resumed trains on the same batches, in the same order, and ends
at the same weights as an uninterrupted one)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.fashion_mnist import FashionMNIST
from datamodules.loader import EpochSampler, check_split_size, make_loader


def write_fmnist(directory: Path, train: int) -> None:
    """IDX files of ``train`` + 4 images whose first pixel is the image's number."""
    directory.mkdir()
    for stem, n in (("train", train), ("t10k", 4)):
        pixels = bytearray(n * 784)
        pixels[::784] = bytes(range(n))
        header = bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
        (directory / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels))
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n))
        (directory / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


class Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.linear(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Crash(Exception):
    pass


class Record(Callback):
    """The images of each trained batch (by their first pixel); a crash before global step ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.seen = stop_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.stop_at:
            raise Crash

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch[0][:, 0, 0, 0].tolist())


def fit(data_dir, root, record, ckpt_path=None, every=None):
    callbacks = [record] + ([ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every,
                                             save_top_k=-1)] if every else [])
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                      default_root_dir=root)
    torch.manual_seed(0)
    model = Linear()
    dm = FashionMNIST(data_dir=str(data_dir), batch_size=8, val_size=5, seed=1)
    if every:
        with pytest.raises(Crash):
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_mid_epoch_resume_replays_the_uninterrupted_order_and_weights(tmp_path):
    write_fmnist(tmp_path / "data", train=45)  # 40 training images: 5 batches of 8 per epoch
    straight = Record()
    reference = fit(tmp_path / "data", tmp_path / "a", straight)
    assert len(straight.seen) == 10 and straight.seen[:5] != straight.seen[5:]  # a new order each epoch
    first, second = Record(stop_at=7), Record()
    fit(tmp_path / "data", tmp_path / "b", first, every=7)  # crash in epoch 1 after 2 of its batches
    resumed = fit(tmp_path / "data", tmp_path / "b", second,
                  ckpt_path=tmp_path / "b" / "ckpt" / "epoch=1-step=7.ckpt")
    assert first.seen + second.seen == straight.seen
    for p, q in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_epoch_sampler_is_a_seeded_permutation_and_skips_once():
    sampler = EpochSampler(10, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(10)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    sampler.start = 4
    assert list(sampler) == epoch0[4:] and list(sampler) == epoch0


def test_split_sizes():
    with pytest.raises(ValueError, match=r"train split: 0 samples, fewer than one whole batch"):
        make_loader([], "train", 4, 0, shuffle=True)
    with pytest.raises(ValueError, match=r"\(batch_size 4 x 2 devices = 8\)"):
        check_split_size("train", 7, 4, world_size=2)
    with pytest.warns(UserWarning, match="test split is empty"):
        make_loader([], "test", 4, 0)
    assert len(make_loader(list(range(3)), "train", 4, 0, shuffle=True, drop_last=True)) == 1
