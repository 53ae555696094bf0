"""An unbounded Criteo-shaped click stream with a known achievable loss.

Sample ``i`` is a pure function of ``(seed, i)`` (a counter-based hash, not a sequential
random generator, so any sample range is generated directly, on the CPU or on the training GPU,
with the same integers on both and floats equal to rounding): 13 dense features (log-transformed
log-normal counts, as Criteo's after ``log(1 + x)``), 26 categorical ids drawn from a bounded
Zipf law over Criteo-1TB-like cardinalities, and a click drawn from a hidden teacher (its own
embeddings + an MLP). The teacher's click probability is known per sample, so the best achievable
log loss (the mean Bernoulli entropy) is known, and more data keeps helping a student until it
reaches it: the regime of data-scaling studies (Ardalani et al., arXiv 2208.08489).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.ctr.batch import CTRSchema, make_tensor_batch
from datamodules.ctr.stream import BatchStream, StreamLoader
from datamodules.loader import check_split_size

# Per-feature distinct values of Criteo 1TB (as in the MLPerf DLRM reference).
CRITEO_1TB_CARDINALITIES = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35)
STREAMS = {"train": 1, "val": 2, "test": 3}
MASK32 = 0xFFFFFFFF
#: Samples generated at once on a GPU (a few hundred MB of intermediates at 26 features).
GENERATION_CHUNK = 1 << 17


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


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' lowbias32) of int64 values in ``[0, 2**32)``: integer ops
    only, so it gives the same bits on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniforms(key: int, indices: torch.Tensor, columns: int) -> torch.Tensor:
    """``(len(indices), columns)`` float64 uniforms in (0, 1), a pure function of (key, index,
    column): 24 random bits per value, centred in their bin."""
    low = hash32((indices & MASK32) ^ key)
    row = hash32(low ^ (indices >> 32))
    cols = torch.arange(columns, device=indices.device, dtype=torch.int64) * 0x9E3779B9 & MASK32
    bits = hash32((row[:, None] + cols[None, :]) & MASK32) >> 8
    return (bits.double() + 0.5) * (1.0 / (1 << 24))


def bounded_zipf(u, n: int, exponent: float):
    """Ids in ``[0, n)`` with P(id = k) roughly proportional to ``(k + 1) ** -exponent``.

    Inverse CDF of the continuous power law on ``[1, n + 1)`` applied to uniforms ``u`` (a
    numpy array or a float64 tensor; the result is int64 of the same kind).
    """
    lib = torch if isinstance(u, torch.Tensor) else np
    if n <= 1:
        return lib.zeros_like(u, dtype=lib.int64)
    if abs(exponent - 1.0) < 1e-9:
        x = lib.exp(u * math.log(n + 1.0))
    else:
        e = 1.0 - exponent
        x = ((math.pow(n + 1.0, e) - 1.0) * u + 1.0) ** (1.0 / e)
    if lib is torch:
        return (x.long() - 1).clamp(0, n - 1)
    return np.minimum(x.astype(np.int64) - 1, n - 1).clip(0)


class Teacher:
    """The hidden labeller: per-feature embeddings (dim ``dim``), a one-hidden-layer MLP.

    Its weights are drawn with numpy (the same on every machine) and copied to each device it
    runs on (:meth:`to`); the network runs in float32 where the samples are generated.
    """

    def __init__(self, seed: int, num_dense: int, cardinalities: tuple[int, ...], dim: int,
                 hidden: int, signal: float, base_rate: float) -> None:
        rng = np.random.default_rng([seed, 0])
        # One table of all features' rows; feature f starts at row offsets[f]. Drawn table by
        # table into one float32 array: standard_normal draws what normal(0, 1) draws, without
        # the per-table float32 copies and their concatenation (seconds at 7M rows).
        table = np.empty((sum(cardinalities), dim), dtype=np.float32)
        at = 0
        for c in cardinalities:
            table[at:at + c] = rng.standard_normal((c, dim))
            at += c
        self.table = torch.from_numpy(table)
        self.offsets = torch.tensor(np.cumsum([0, *cardinalities[:-1]]), dtype=torch.int64)
        width = num_dense + dim * len(cardinalities)
        self.w1 = torch.from_numpy(rng.normal(0.0, math.sqrt(2.0 / width), (width, hidden)).astype(np.float32))
        self.b1 = torch.from_numpy(rng.normal(0.0, 0.1, hidden).astype(np.float32))
        self.w2 = torch.from_numpy(rng.normal(0.0, math.sqrt(1.0 / hidden), hidden).astype(np.float32))
        self.scale, self.shift = 1.0, 0.0
        self.num_dense = num_dense
        # Standardise the logit on a pilot sample so its spread is `signal` and the click rate
        # is near `base_rate`.
        self._signal, self._base_rate = signal, base_rate
        self._copies: dict[torch.device, "Teacher"] = {}

    def to(self, device: torch.device) -> "Teacher":
        """This teacher with its weights on ``device`` (cached; the CPU one is ``self``)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        if device not in self._copies:
            copy = object.__new__(Teacher)
            copy.__dict__.update(self.__dict__)
            for name in ("table", "offsets", "w1", "b1", "w2"):
                setattr(copy, name, getattr(self, name).to(device))
            copy._copies = {}
            self._copies[device] = copy
        return self._copies[device]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_copies": {}}  # DataLoader workers get the CPU weights only

    def calibrate(self, dense, ids) -> None:
        """Scale the logit to spread ``signal`` and shift it so the mean click probability on
        the pilot sample is ``base_rate`` (bisection: the mean is monotone in the shift)."""
        raw = self.raw_logit(torch.as_tensor(dense), torch.as_tensor(ids)).double().numpy()
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

    def raw_logit(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 logit before calibration of ``(B, num_dense)`` features, ``(B, F)`` ids."""
        embedded = self.table[ids + self.offsets].flatten(1)  # (B, F * dim)
        x = torch.cat([dense.float(), embedded], dim=1)
        return torch.relu(x @ self.w1 + self.b1) @ self.w2

    def probability(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * self.raw_logit(dense, ids) + self.shift)


class SyntheticSource:
    """Generates any sample range of one split on ``device``; picklable, so DataLoader workers
    rebuild it (CPU only: CUDA cannot be used in forked workers)."""

    def __init__(self, seed: int, split: str, schema: CTRSchema, exponent: float,
                 teacher: Teacher, device: torch.device | str = "cpu") -> None:
        self.seed, self.stream = seed, STREAMS[split]
        self.schema, self.exponent, self.teacher = schema, exponent, teacher
        self.device = torch.device(device)
        self.key = int(hash32(torch.tensor([(seed * 8 + self.stream) & MASK32]))[0])

    def generate(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Dense ``(B, num_dense)`` float32, ids ``(B, F)`` int64, teacher probability ``(B,)``
        float32 and label ``(B,)`` float32 of the given global sample indices, on ``device``."""
        idx = self._indices(indices)
        num_dense, cards = self.schema.num_dense, self.schema.cardinalities
        u = uniforms(self.key, idx, num_dense + len(cards) + 1)
        # Log-normal(1, 1.5) counts through the normal's inverse CDF, then Criteo's log(1 + x).
        counts = torch.floor(torch.exp(1.0 + 1.5 * torch.special.ndtri(u[:, :num_dense])))
        dense = torch.log1p(counts).float()
        ids = torch.stack([bounded_zipf(u[:, num_dense + f], n, self.exponent)
                           for f, n in enumerate(cards)], dim=1)
        prob = self.teacher.to(self.device).probability(dense, ids)
        labels = (u[:, -1] < prob.double()).float()
        return dense, ids, prob, labels

    def _indices(self, indices) -> torch.Tensor:
        """The indices as an int64 tensor on ``device``; a contiguous range (the usual case) is
        made there, so no host-to-device copy (which would wait for the GPU) is needed."""
        if isinstance(indices, torch.Tensor):
            return indices.to(self.device)
        indices = np.asarray(indices, dtype=np.int64)
        if self.device.type != "cpu" and len(indices) > 0 and (np.diff(indices) == 1).all():
            return torch.arange(int(indices[0]), int(indices[-1]) + 1, device=self.device)
        host = torch.from_numpy(indices)
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    #: Batches generated by one call of :meth:`make_batches` (set above 1 on a GPU, where a
    #: batch is too small to keep the device busy; the samples do not depend on it).
    chunk_batches = 1

    def make_batches(self, spans: list[tuple[int, int]]) -> list:
        """The batches of the sample ranges ``[start, stop)`` from one generation."""
        idx = torch.cat([torch.arange(a, b, device=self.device) for a, b in spans])
        dense, ids, _prob, labels = self.generate(idx)
        out, at = [], 0
        for a, b in spans:
            part = slice(at, at + b - a)
            out.append(make_tensor_batch(dense[part], ids[part], labels[part], idx[part],
                                         self.schema.sparse_names))
            at += b - a
        return out

    def __call__(self, indices: np.ndarray):
        idx = self._indices(indices)
        dense, ids, _prob, labels = self.generate(idx)
        return make_tensor_batch(dense, ids, labels, idx, self.schema.sparse_names)

    def probability(self, indices: np.ndarray) -> np.ndarray:
        """The teacher's click probability of each sample, as float32 numpy."""
        return self.generate(indices)[2].cpu().numpy()

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.cpu().numpy() for t in self.generate(indices))


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
        num_workers: DataLoader workers (each generates its own batches, on the CPU).
        device: where the samples (ids, features and the teacher's labels) are generated:
            ``"cpu"``, ``"cuda"`` (the training GPU, in the main process: no workers) or
            ``"auto"`` (the training GPU when there is one and ``num_workers`` is 0). The same
            seed gives the same samples on either (ids exactly, floats to rounding).
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
        device: Literal["cpu", "cuda", "auto"] = "cpu",
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null, got {eval_batch_size!r}")
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
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        if device == "cuda" and num_workers > 0:
            raise ValueError(f"num_workers: generation on the GPU (device: cuda) runs in the "
                             f"main process; set num_workers: 0, or device: cpu to generate in "
                             f"{num_workers} workers")
        cards = CRITEO_1TB_CARDINALITIES if cardinalities is None else tuple(cardinalities)
        if not cards or any(c < 1 for c in cards):
            raise ValueError(f"cardinalities must be a non-empty list of ints >= 1, got {cardinalities!r}")
        self.save_hyperparameters()
        self.batch_size, self.train_samples = batch_size, train_samples
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_samples, self.test_samples = val_samples, test_samples
        self.num_workers, self.device = num_workers, device
        capped = tuple(min(c, max_cardinality) for c in cards)
        self.schema = CTRSchema(num_dense, tuple(f"cat_{i}" for i in range(len(capped))), capped)
        self.teacher = Teacher(seed, num_dense, capped, teacher_dim, teacher_hidden,
                               teacher_signal, base_rate)
        rng = np.random.default_rng([seed, 9])
        pilot_dense = np.log1p(np.floor(rng.lognormal(1.0, 1.5, (8192, num_dense)))).astype(np.float32)
        pilot_ids = np.stack([bounded_zipf(rng.random(8192), n, zipf_exponent) for n in capped], 1)
        self.teacher.calibrate(pilot_dense, pilot_ids)
        self._sources: dict[tuple[str, torch.device], SyntheticSource] = {}

    def generation_device(self) -> torch.device:
        """The device the batches are generated on (see ``device``)."""
        root = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.device == "cpu" or (self.device == "auto" and self.num_workers > 0):
            return torch.device("cpu")
        if root is not None and root.type == "cuda":
            return root
        if self.device == "auto" and (root is not None or not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' but no CUDA device is available; use device: cpu "
                             "or auto")
        return torch.device("cuda", torch.cuda.current_device())

    def source(self, split: str) -> SyntheticSource:
        """The generator of one split on :meth:`generation_device`."""
        key = (split, self.generation_device())
        if key not in self._sources:
            hp = self.hparams
            source = SyntheticSource(hp.seed, split, self.schema, hp.zipf_exponent,
                                     self.teacher, key[1])
            if key[1].type != "cpu":  # one generation per GENERATION_CHUNK samples or so
                source.chunk_batches = max(1, GENERATION_CHUNK // self._batch_size(split))
            self._sources[key] = source
        return self._sources[key]

    def _batch_size(self, split: str) -> int:
        return self.batch_size if split == "train" else self.eval_batch_size

    def achievable_logloss(self, split: str = "val", num_samples: int | None = None) -> float:
        """The teacher's own expected log loss: the mean Bernoulli entropy of its probabilities."""
        n = num_samples or (self.val_samples if split == "val" else self.test_samples)
        prob = self.source(split).probability(np.arange(n))
        p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
        return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))

    def setup(self, stage: str | None = None) -> None:
        """Check that the stage has data: a training budget of at least one batch per device
        (an error), non-empty evaluation streams (a warning)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if stage in (None, "fit"):
            check_split_size("train", self.train_samples, self.batch_size, world, "train_samples")
        if stage in (None, "fit", "validate"):
            check_split_size("val", self.val_samples, self.eval_batch_size, where="val_samples")
        if stage in (None, "test"):
            check_split_size("test", self.test_samples, self.eval_batch_size, where="test_samples")

    def _loader(self, split: str, num_samples: int, train: bool) -> DataLoader:
        source = self.source(split)
        stream = BatchStream(num_samples, self._batch_size(split), source, drop_last=train)
        # Host batches are pinned on a GPU machine, so the copy to the GPU does not block.
        pin = source.device.type == "cpu" and torch.cuda.is_available()
        return StreamLoader(stream, self.num_workers, self.trainer if train else None, pin)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_samples, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_samples, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_samples, train=False)
