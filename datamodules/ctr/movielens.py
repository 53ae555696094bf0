"""MovieLens-100k as click-through data, read from the installed ``recbole`` package.

A click is a rating >= 4 (55.4% of the 100,000 ratings). Sparse features: user id, item id,
age bucket, gender, occupation, zip prefix (first three characters), release decade, and the
movie's genres as one bag of ids; dense features: age / 100 and (release year - 1900) / 100.
Ratings are split into train / val / test at random by ``seed``. The data's licence forbids
redistribution, so it is read from the package's files and never copied into this repository.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.ctr.batch import CTRSchema, make_bag_batch
from datamodules.ctr.stream import BatchStream, StreamLoader
from datamodules.loader import check_split_size

SINGLE = ("user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix", "decade")
SPARSE_NAMES = SINGLE + ("genres",)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
INSTALL_HINT = ("pip install --no-deps recbole (the package ships MovieLens-100k under "
                "recbole/dataset_example/ml-100k), or pass data_dir")


def default_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MovieLens100K: recbole is not installed; {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def _rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens100K: {path} not found; {INSTALL_HINT}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:]  # header: name:type per column


def _vocab(tokens) -> dict[str, int]:
    """Id 0 is reserved for unknown/missing; the rest in sorted order (deterministic)."""
    return {t: i + 1 for i, t in enumerate(sorted(set(tokens)))}


class MovieLensTables:
    """Every rating's features as arrays (ids per sparse feature, genres CSR, dense, labels)."""

    def __init__(self, data_dir: Path) -> None:
        users = {r[0]: r for r in _rows(data_dir / "ml-100k.user")}
        items = {r[0]: r for r in _rows(data_dir / "ml-100k.item")}
        inter = _rows(data_dir / "ml-100k.inter")
        vocab = {
            "user_id": _vocab(users), "item_id": _vocab(items),
            "gender": _vocab(u[2] for u in users.values()),
            "occupation": _vocab(u[3] for u in users.values()),
            "zip_prefix": _vocab(u[4][:3] for u in users.values()),
            "decade": _vocab(_decade(i[2]) for i in items.values()),
            "genres": _vocab(g for i in items.values() for g in i[3].split()),
        }
        n = len(inter)
        ids = {name: np.zeros(n, dtype=np.int64) for name in SINGLE}
        dense = np.zeros((n, 2), dtype=np.float32)
        labels = np.zeros(n, dtype=np.float32)
        genre_lists: list[list[int]] = []
        for j, (user, item, rating, _time) in enumerate(inter):
            u, it = users[user], items[item]
            age = int(u[1])
            ids["user_id"][j] = vocab["user_id"][user]
            ids["item_id"][j] = vocab["item_id"][item]
            ids["age_bucket"][j] = int(np.searchsorted(AGE_EDGES, age, side="right")) + 1
            ids["gender"][j] = vocab["gender"][u[2]]
            ids["occupation"][j] = vocab["occupation"][u[3]]
            ids["zip_prefix"][j] = vocab["zip_prefix"][u[4][:3]]
            ids["decade"][j] = vocab["decade"][_decade(it[2])]
            year = int(it[2]) if it[2].isdigit() else 1900
            dense[j] = (age / 100.0, (year - 1900) / 100.0)
            labels[j] = float(float(rating) >= 4.0)
            genre_lists.append([vocab["genres"][g] for g in it[3].split()] or [0])
        self.ids, self.dense, self.labels = ids, dense, labels
        self.genre_lengths = np.array([len(g) for g in genre_lists], dtype=np.int64)
        self.genre_offsets = np.concatenate([[0], np.cumsum(self.genre_lengths)])
        self.genre_values = np.array([g for gs in genre_lists for g in gs], dtype=np.int64)
        self.cardinalities = tuple(len(vocab[name]) + 1 if name in vocab else len(AGE_EDGES) + 2
                                   for name in SPARSE_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def genres(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Genre ids of the given ratings, concatenated, and their bag lengths."""
        lengths = self.genre_lengths[rows]
        values = np.concatenate([self.genre_values[self.genre_offsets[r]:self.genre_offsets[r + 1]]
                                 for r in rows]) if len(rows) else np.zeros(0, np.int64)
        return values, lengths


def _decade(year: str) -> str:
    return f"{year[:3]}0s" if year.isdigit() else "unknown"


class MovieLensSource:
    """Batches of one split: position ``i`` of the split is rating ``rows[i]``."""

    def __init__(self, tables: MovieLensTables, rows: np.ndarray) -> None:
        self.tables, self.rows = tables, rows

    def __call__(self, positions: np.ndarray):
        t, rows = self.tables, self.rows[positions]
        bags = [(t.ids[name][rows], np.ones(len(rows), dtype=np.int64)) for name in SINGLE]
        bags.append(t.genres(rows))
        return make_bag_batch(t.dense[rows], bags, t.labels[rows], rows, SPARSE_NAMES)


class MovieLens100K(LightningDataModule):
    """MovieLens-100k clicks (rating >= 4) with user and item features, split by seed.

    Args:
        data_dir: folder with ``ml-100k.{inter,user,item}`` (default: inside ``recbole``).
        batch_size: samples per batch.
        val_fraction, test_fraction: shares of the 100k ratings held out.
        seed: seed of the split and of the per-epoch shuffling.
        train_samples: cap on training ratings per epoch (``None`` = the whole train split).
        num_workers: DataLoader workers (persistent, so shuffling changes every epoch).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        train_samples: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction, test_fraction must be in (0, 1) with a sum < 1, got "
                             f"{val_fraction!r}, {test_fraction!r}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir else default_dir()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.tables = MovieLensTables(self.data_dir)
        n = len(self.tables)
        order = np.random.default_rng(seed).permutation(n)
        n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
        train_rows = order[n_val + n_test:]
        if train_samples is not None:
            train_rows = train_rows[:train_samples]
        self.rows = {"val": np.sort(order[:n_val]), "test": np.sort(order[n_val:n_val + n_test]),
                     "train": np.sort(train_rows)}
        self.schema = CTRSchema(2, SPARSE_NAMES, self.tables.cardinalities)

    def setup(self, stage: str | None = None) -> None:
        """Check that the training split holds at least one batch per device."""
        if stage in (None, "fit"):
            world = self.trainer.world_size if self.trainer is not None else 1
            check_split_size("train", len(self.rows["train"]), self.batch_size, world,
                             "MovieLens-100k train split after train_samples")

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        stream = BatchStream(len(self.rows[split]), self.batch_size,
                             MovieLensSource(self.tables, self.rows[split]), drop_last=train,
                             shuffle_seed=self.seed if train else None)
        return StreamLoader(stream, self.num_workers, self.trainer if train else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
