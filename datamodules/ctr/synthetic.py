"""An unbounded Criteo-shaped click stream with a known achievable loss.

Sample ``i`` is a pure function of ``(seed, i)``: 13 dense features (log-transformed
log-normal counts, as Criteo's after ``log(1 + x)``), 26 categorical ids drawn from a bounded
Zipf law over Criteo-1TB-like cardinalities, and a click drawn from a hidden teacher (its own
embeddings + an MLP). The teacher's click probability is known per sample, so the best achievable
log loss (the mean Bernoulli entropy) is known, and more data keeps helping a student until it
reaches it: the regime of data-scaling studies (Ardalani et al., arXiv 2208.08489).
"""

from __future__ import annotations

import math

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.ctr.batch import CTRSchema, make_batch
from datamodules.ctr.stream import BatchStream, StreamLoader
from datamodules.loader import check_split_size

# Per-feature distinct values of Criteo 1TB (as in the MLPerf DLRM reference).
CRITEO_1TB_CARDINALITIES = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35)
CHUNK = 1024  # samples are generated in chunks of this many, each seeded by (seed, stream, chunk)
STREAMS = {"train": 1, "val": 2, "test": 3}


def bounded_zipf(u: np.ndarray, n: int, exponent: float) -> np.ndarray:
    """Ids in ``[0, n)`` with P(id = k) roughly proportional to ``(k + 1) ** -exponent``.

    Inverse CDF of the continuous power law on ``[1, n + 1)`` applied to uniforms ``u``.
    """
    if n <= 1:
        return np.zeros_like(u, dtype=np.int64)
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        e = 1.0 - exponent
        x = ((math.pow(n + 1.0, e) - 1.0) * u + 1.0) ** (1.0 / e)
    return np.minimum(x.astype(np.int64) - 1, n - 1).clip(0)


class Teacher:
    """The hidden labeller: per-feature embeddings (dim ``dim``), a one-hidden-layer MLP."""

    def __init__(self, seed: int, num_dense: int, cardinalities: tuple[int, ...], dim: int,
                 hidden: int, signal: float, base_rate: float) -> None:
        rng = np.random.default_rng([seed, 0])
        self.tables = [rng.normal(0.0, 1.0, (c, dim)).astype(np.float32) for c in cardinalities]
        width = num_dense + dim * len(cardinalities)
        self.w1 = rng.normal(0.0, math.sqrt(2.0 / width), (width, hidden)).astype(np.float32)
        self.b1 = rng.normal(0.0, 0.1, hidden).astype(np.float32)
        self.w2 = rng.normal(0.0, math.sqrt(1.0 / hidden), hidden).astype(np.float32)
        self.scale, self.shift = 1.0, 0.0
        self.num_dense = num_dense
        # Standardise the logit on a pilot sample so its spread is `signal` and the click rate
        # is near `base_rate`.
        self._signal, self._base_rate = signal, base_rate

    def calibrate(self, dense: np.ndarray, ids: np.ndarray) -> None:
        """Scale the logit to spread ``signal`` and shift it so the mean click probability on
        the pilot sample is ``base_rate`` (bisection: the mean is monotone in the shift)."""
        raw = self.raw_logit(dense, ids).astype(np.float64)
        self.scale = self._signal / max(float(raw.std()), 1e-6)
        z = self.scale * (raw - raw.mean())
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < self._base_rate:
                lo = mid
            else:
                hi = mid
        self.shift = 0.5 * (lo + hi) - self.scale * float(raw.mean())

    def raw_logit(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        embedded = [table[ids[:, f]] for f, table in enumerate(self.tables)]
        x = np.concatenate([dense] + embedded, axis=1)
        return np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2

    def probability(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        z = self.scale * self.raw_logit(dense, ids) + self.shift
        return 1.0 / (1.0 + np.exp(-z))


class SyntheticSource:
    """Generates any sample range of one split; picklable, so DataLoader workers rebuild it."""

    def __init__(self, seed: int, split: str, schema: CTRSchema, exponent: float,
                 teacher: Teacher) -> None:
        self.seed, self.stream = seed, STREAMS[split]
        self.schema, self.exponent, self.teacher = schema, exponent, teacher

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dense, ids, teacher probability and label of samples ``[c * CHUNK, (c + 1) * CHUNK)``."""
        rng = np.random.default_rng([self.seed, self.stream, c])
        counts = np.floor(rng.lognormal(1.0, 1.5, (CHUNK, self.schema.num_dense)))
        dense = np.log1p(counts).astype(np.float32)
        u = rng.random((CHUNK, len(self.schema.cardinalities)))
        ids = np.stack([bounded_zipf(u[:, f], n, self.exponent)
                        for f, n in enumerate(self.schema.cardinalities)], axis=1)
        prob = self.teacher.probability(dense, ids)
        labels = (rng.random(CHUNK) < prob).astype(np.float32)
        return dense, ids, prob, labels

    def __call__(self, indices: np.ndarray):
        dense, ids, _prob, labels = self._gather(indices)
        return make_batch(dense, ids, labels, indices, self.schema.sparse_names)

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        chunks = indices // CHUNK
        unique = np.unique(chunks)
        if len(unique) == 1:  # the common case: one chunk, slice it
            part = self.chunk(int(unique[0]))
            rows = indices % CHUNK
            return tuple(a[rows] for a in part)
        parts = [self.chunk(int(c)) for c in unique]
        stacked = [np.concatenate([p[j] for p in parts]) for j in range(4)]
        position = np.searchsorted(unique, chunks) * CHUNK + indices % CHUNK
        return tuple(a[position] for a in stacked)


class SyntheticCTR(LightningDataModule):
    """Criteo-shaped synthetic clicks from a hidden teacher, deterministic by seed.

    Args:
        batch_size: samples per batch (per device).
        train_samples: the training budget N (single epoch: each sample seen once).
        val_samples, test_samples: sizes of the held-out streams (other seeds' streams).
        seed: determines the teacher and every sample.
        num_dense: dense features (Criteo: 13).
        cardinalities: distinct ids per sparse feature (default Criteo 1TB's 26 tables).
        max_cardinality: caps every cardinality (keeps the teacher's tables small).
        zipf_exponent: popularity skew of the ids (larger = more skewed).
        teacher_dim, teacher_hidden: the teacher's embedding dim and MLP width.
        teacher_signal: standard deviation of the teacher's logit (larger = more learnable).
        base_rate: approximate click rate.
        num_workers: DataLoader workers (each generates its own batches).
    """

    def __init__(
        self,
        batch_size: int = 2048,
        train_samples: int = 1_000_000,
        val_samples: int = 32768,
        test_samples: int = 32768,
        seed: int = 0,
        num_dense: int = 13,
        cardinalities: list[int] | None = None,
        max_cardinality: int = 100_000,
        zipf_exponent: float = 1.05,
        teacher_dim: int = 8,
        teacher_hidden: int = 32,
        teacher_signal: float = 2.0,
        base_rate: float = 0.25,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("train_samples", train_samples),
                            ("max_cardinality", max_cardinality), ("teacher_dim", teacher_dim),
                            ("teacher_hidden", teacher_hidden), ("num_dense", num_dense)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        for name, value in (("val_samples", val_samples), ("test_samples", test_samples)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if zipf_exponent <= 0:
            raise ValueError(f"zipf_exponent must be > 0, got {zipf_exponent!r}")
        if not 0.0 < base_rate < 1.0:
            raise ValueError(f"base_rate must be in (0, 1), got {base_rate!r}")
        cards = CRITEO_1TB_CARDINALITIES if cardinalities is None else tuple(cardinalities)
        if not cards or any(c < 1 for c in cards):
            raise ValueError(f"cardinalities must be a non-empty list of ints >= 1, got {cardinalities!r}")
        self.save_hyperparameters()
        self.batch_size, self.train_samples = batch_size, train_samples
        self.val_samples, self.test_samples = val_samples, test_samples
        self.num_workers = num_workers
        capped = tuple(min(c, max_cardinality) for c in cards)
        self.schema = CTRSchema(num_dense, tuple(f"cat_{i}" for i in range(len(capped))), capped)
        self.teacher = Teacher(seed, num_dense, capped, teacher_dim, teacher_hidden,
                               teacher_signal, base_rate)
        rng = np.random.default_rng([seed, 9])
        pilot_dense = np.log1p(np.floor(rng.lognormal(1.0, 1.5, (8192, num_dense)))).astype(np.float32)
        pilot_ids = np.stack([bounded_zipf(rng.random(8192), n, zipf_exponent) for n in capped], 1)
        self.teacher.calibrate(pilot_dense, pilot_ids)
        self.sources = {split: SyntheticSource(seed, split, self.schema, zipf_exponent, self.teacher)
                        for split in STREAMS}

    def source(self, split: str) -> SyntheticSource:
        return self.sources[split]

    def achievable_logloss(self, split: str = "val", num_samples: int | None = None) -> float:
        """The teacher's own expected log loss: the mean Bernoulli entropy of its probabilities."""
        n = num_samples or (self.val_samples if split == "val" else self.test_samples)
        _dense, _ids, prob, _labels = self.sources[split]._gather(np.arange(n))
        p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
        return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))

    def setup(self, stage: str | None = None) -> None:
        """Check that the stage has data: a training budget of at least one batch per device
        (an error), non-empty evaluation streams (a warning)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if stage in (None, "fit"):
            check_split_size("train", self.train_samples, self.batch_size, world, "train_samples")
        if stage in (None, "fit", "validate"):
            check_split_size("val", self.val_samples, self.batch_size, where="val_samples")
        if stage in (None, "test"):
            check_split_size("test", self.test_samples, self.batch_size, where="test_samples")

    def _loader(self, split: str, num_samples: int, train: bool) -> DataLoader:
        stream = BatchStream(num_samples, self.batch_size, self.sources[split], drop_last=train)
        return StreamLoader(stream, self.num_workers, self.trainer if train else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_samples, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_samples, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_samples, train=False)
