"""SyntheticCTR: deterministic by seed, Zipf ids, a teacher with a known achievable loss."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.ctr.synthetic import SyntheticCTR, bounded_zipf
from models.dlrm.metrics import binary_entropy

SMALL = dict(cardinalities=[50, 1000, 3], num_dense=4, val_samples=4096, test_samples=1024)


def values(batch):
    return (batch.dense_features.numpy(), batch.sparse_features.values().numpy(),
            batch.labels.numpy(), batch.indices.numpy())


def test_deterministic_by_seed_and_independent_of_batching():
    a = SyntheticCTR(batch_size=512, train_samples=2048, seed=3, **SMALL)
    b = SyntheticCTR(batch_size=512, train_samples=2048, seed=3, **SMALL)
    for x, y in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        for u, v in zip(values(x), values(y)):
            np.testing.assert_array_equal(u, v)
    # Sample i is a function of (seed, i): the same rows come out with another batch size.
    c = SyntheticCTR(batch_size=300, train_samples=2048, seed=3, **SMALL)
    first = next(iter(a.train_dataloader()))
    rows = np.concatenate([values(bt)[0] for bt in c.train_dataloader()])[:512]
    np.testing.assert_array_equal(rows, values(first)[0])
    other = next(iter(SyntheticCTR(batch_size=512, train_samples=2048, seed=4, **SMALL).train_dataloader()))
    assert not np.array_equal(values(other)[1], values(first)[1])


def test_bounded_zipf_against_the_power_law():
    u = np.random.default_rng(0).random(400_000)
    ids = bounded_zipf(u, 1000, 1.2)
    assert ids.min() >= 0 and ids.max() <= 999
    counts = np.bincount(ids, minlength=1000)
    # The continuous law puts mass (k+1)^(1-a) - (k+2)^(1-a) on id k, normalised over [1, n+1).
    edges = np.arange(1, 1002, dtype=np.float64) ** (1 - 1.2)
    expected = (edges[:-1] - edges[1:]) / (edges[0] - edges[-1])
    np.testing.assert_allclose(counts[:5] / len(ids), expected[:5], rtol=0.03)
    assert bounded_zipf(u[:10], 1, 1.2).tolist() == [0] * 10


def test_teacher_labels_and_achievable_loss():
    dm = SyntheticCTR(batch_size=4096, train_samples=4096, base_rate=0.25, **SMALL)
    batch = next(iter(dm.val_dataloader()))
    rate = float(batch.labels.mean())
    assert rate == pytest.approx(0.25, abs=0.03)  # calibrated on a pilot sample
    achievable = dm.achievable_logloss("val")
    # The teacher knows more than the base rate: its loss is below the base rate's entropy.
    assert 0.1 < achievable < binary_entropy(rate) - 0.05
    # Labels really are Bernoulli(teacher p): their mean log loss under p matches its entropy.
    _d, _i, prob, labels = dm.source("val")._gather(np.arange(4096))
    p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
    nll = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert nll == pytest.approx(achievable, abs=0.02)


def test_schema_and_workers_read_each_sample_once():
    dm = SyntheticCTR(batch_size=256, train_samples=256 * 7 + 100, num_workers=2, **SMALL)
    assert dm.schema.cardinalities == (50, 1000, 3)
    seen = [i for b in dm.train_dataloader() for i in b.indices.tolist()]
    assert sorted(seen) == list(range(256 * 7))
    assert len(dm.train_dataloader()) == 7


def test_bad_settings():
    with pytest.raises(ValueError, match="base_rate"):
        SyntheticCTR(base_rate=1.5, **SMALL)
    with pytest.raises(ValueError, match="cardinalities"):
        SyntheticCTR(cardinalities=[], num_dense=4)


def test_budget_smaller_than_a_batch_is_an_error_naming_the_sizes():
    dm = SyntheticCTR(batch_size=512, train_samples=300, **SMALL)
    with pytest.raises(ValueError, match=r"train_samples.*300 samples, fewer than one whole batch \(batch_size 512 = 512\)"):
        dm.setup("fit")
    dm.setup("test")  # the training budget does not matter for testing
    with pytest.warns(UserWarning, match="val split .*val_samples.* is empty"):
        SyntheticCTR(batch_size=512, train_samples=512, **{**SMALL, "val_samples": 0}).setup("fit")
    with pytest.raises(ValueError, match="val_samples must be >= 0"):
        SyntheticCTR(**{**SMALL, "val_samples": -1})


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 on Python ints (exact, no overflow): the reference for hash32."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_counter_hash_is_exact_32_bit_arithmetic():
    """The generator's integer mix in int64 tensors (whose products wrap past 2**63) equals the
    exact integer function, so the ids and labels are the same bits on any device."""
    import torch

    from datamodules.ctr.synthetic import hash32, uniforms

    xs = [0, 1, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    assert hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    key, idx = 77, [0, 5, 2**33 + 9]
    u = uniforms(key, torch.tensor(idx), 3)
    for r, i in enumerate(idx):
        row = lowbias32(lowbias32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32))
        for c in range(3):
            bits = lowbias32((row + c * 0x9E3779B9 & 0xFFFFFFFF) & 0xFFFFFFFF) >> 8
            assert u[r, c].item() == (bits + 0.5) / 2**24


def test_teacher_probability_float32_against_float64_numpy():
    """The teacher network in float32 (as on the GPU) against the same network re-derived in
    float64 numpy from its weights: equal within float32 rounding."""
    dm = SyntheticCTR(batch_size=256, train_samples=256, **SMALL)
    source = dm.source("val")
    dense, ids, prob, _labels = source._gather(np.arange(1000))
    t = dm.teacher
    table, offsets = t.table.double().numpy(), t.offsets.numpy()
    x = np.concatenate([dense.astype(np.float64), table[ids + offsets].reshape(len(ids), -1)], 1)
    hidden = np.maximum(x @ t.w1.double().numpy() + t.b1.double().numpy(), 0.0)
    z = t.scale * (hidden @ t.w2.double().numpy()) + t.shift
    np.testing.assert_allclose(prob, 1.0 / (1.0 + np.exp(-z)), atol=2e-6)


def test_device_setting_is_checked():
    with pytest.raises(ValueError, match="device must be"):
        SyntheticCTR(device="tpu", **SMALL)
    with pytest.raises(ValueError, match="num_workers: generation on the GPU"):
        SyntheticCTR(device="cuda", num_workers=2, **SMALL)
    # auto without a GPU (or with workers) generates on the CPU.
    assert SyntheticCTR(device="auto", num_workers=2, **SMALL).generation_device().type == "cpu"


@pytest.mark.parametrize("split", ["train", "val"])
def test_chunked_generation_gives_the_same_batches(split, monkeypatch):
    """Several batches from one generation (what the GPU stream does) are the batches made one
    at a time: same samples in the same order for each reader, a short last batch included
    (val: 4096 = 13 x 300 + 196); labels may differ only where a float tie flips (none here)."""
    from datamodules.ctr import stream
    from datamodules.ctr.sharding import Reader

    plain = SyntheticCTR(batch_size=300, train_samples=2048, seed=3, **SMALL)
    chunked = SyntheticCTR(batch_size=300, train_samples=2048, seed=3, **SMALL)
    chunked.source(split).chunk_batches = 3
    loader = {"train": SyntheticCTR.train_dataloader, "val": SyntheticCTR.val_dataloader}[split]
    for reader in (Reader(0, 1, 1), Reader(1, 2, 2)):
        monkeypatch.setattr(stream, "current_reader", lambda r=reader: r)
        one, many = list(loader(plain)), list(loader(chunked))
        assert len(one) == len(many) > 0
        for x, y in zip(one, many):
            dx, ix, lx, nx = values(x)
            dy, iy, ly, ny = values(y)
            np.testing.assert_array_equal(nx, ny)
            np.testing.assert_array_equal(ix, iy)
            np.testing.assert_array_equal(dx, dy)
            assert (lx != ly).mean() <= 0.005


def test_teacher_tables_are_the_per_table_normal_draws():
    """The teacher's one table holds what drawing each feature's table with
    ``rng.normal(0, 1, (c, dim))`` in float32 and concatenating them gives, bit for bit (the
    samples of a seed did not change when the tables were drawn into one array)."""
    from datamodules.ctr.synthetic import Teacher

    cards, dim = (7, 300, 1, 45), 5
    teacher = Teacher(11, 3, cards, dim, hidden=4, signal=2.0, base_rate=0.25)
    rng = np.random.default_rng([11, 0])
    reference = np.concatenate([rng.normal(0.0, 1.0, (c, dim)).astype(np.float32) for c in cards])
    w1 = rng.normal(0.0, np.sqrt(2.0 / (3 + dim * len(cards))), (3 + dim * len(cards), 4))
    np.testing.assert_array_equal(teacher.table.numpy(), reference)
    np.testing.assert_array_equal(teacher.w1.numpy(), w1.astype(np.float32))  # same stream after


def test_eval_batch_size_changes_batches_not_samples_or_metrics():
    """Validation batches of 512 and of 4096 samples: the same samples, and the module's
    held-out metrics over them agree (to float32 summation order)."""
    import torch

    from models.dlrm.module import DLRMModule

    small = SyntheticCTR(batch_size=512, train_samples=2048, **SMALL)
    large = SyntheticCTR(batch_size=512, eval_batch_size=4096, train_samples=2048, **SMALL)
    a, b = list(small.val_dataloader()), list(large.val_dataloader())
    assert len(a) == 8 and len(b) == 1 and len(b[0].labels) == 4096
    assert torch.equal(torch.cat([x.indices for x in a]), b[0].indices)
    assert torch.equal(torch.cat([x.sparse_features.values().view(3, -1) for x in a], 1),
                       b[0].sparse_features.values().view(3, -1))
    torch.manual_seed(0)
    module = DLRMModule(embedding_dim=4, num_embeddings=64, dense_arch_layer_sizes=[8],
                        over_arch_layer_sizes=[8], num_dense_features=4,
                        sparse_feature_names=list(small.schema.sparse_names),
                        sparse_cardinalities=list(small.schema.cardinalities))
    module.build("cpu")
    first, second = module.held_out_metrics(a), module.held_out_metrics(b)
    for name, value in first.items():
        assert second[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        SyntheticCTR(eval_batch_size=0)
