"""TextClassification on the real Rotten Tomatoes snippets and on CSV/TSV/JSONL files it writes."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.text_classification import TextClassification, deduplicate, read_rows


def test_rotten_tomatoes_counts_and_stratified_split():
    dm = TextClassification(max_samples=None)
    texts, labels = dm.load()
    # Published counts: fresh 7,403 / rotten 5,405 rows; 12,752 distinct snippets.
    assert len(texts) == 12_752 and dm.classes == ["rotten", "fresh"]
    assert sum(labels) == 7_368 and labels.count(0) == 5_384
    assert len(set(texts)) == len(texts)
    from datamodules.text_classification import stratified_split

    train, val, test = stratified_split(labels, 0.1, 0.2, seed=0)
    assert len(test) == 2_551 and len(train) + len(val) + len(test) == 12_752
    assert not set(train) & set(test) and not set(val) & set(test) and not set(train) & set(val)
    for part in (train, val, test):
        assert abs(sum(labels[i] for i in part) / len(part) - 7_368 / 12_752) < 0.002
    assert stratified_split(labels, 0.1, 0.2, seed=0)[2] == test
    assert stratified_split(labels, 0.1, 0.2, seed=1)[2] != test


def test_dynamic_padding_and_tokens_match_the_tokenizer():
    dm = TextClassification(max_samples=100, max_length=16, batch_size=8)
    dm.setup("fit")
    tokenizer = dm.build_tokenizer()
    batch = next(iter(dm.test_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 16  # padded to this batch's longest
    first = dm.splits["test"].ids[0]
    assert first == tokenizer(dm.texts["test"][0], truncation=True, max_length=16)["input_ids"]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    assert torch.equal(batch["input_ids"][0, : len(first)], torch.tensor(first))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_csv_tsv_jsonl_files_dedup_and_errors(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg"), ("good film", "pos"), ("meh", "pos"), ("meh", "neg"),
            ("great", "pos"), ("awful", "neg")]
    (tmp_path / "d.csv").write_text("review,y\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    (tmp_path / "d.tsv").write_text("review\ty\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in rows))
    for name in ("d.csv", "d.tsv", "d.jsonl"):
        assert read_rows(tmp_path / name, "review", "y") == rows
    kept, conflicting = deduplicate(rows)
    assert kept == [("good film", "pos"), ("bad film", "neg"), ("great", "pos"), ("awful", "neg")]
    assert conflicting == 1  # "meh" has two labels: dropped
    with pytest.raises(ValueError, match="text_column: column 'text' not in d.csv"):
        read_rows(tmp_path / "d.csv", "text", "y")
    with pytest.raises(ValueError, match="path: file .* does not exist"):
        read_rows(tmp_path / "missing.csv", "review", "y")
    with pytest.raises(ValueError, match="unknown file type"):
        read_rows(tmp_path / "d.txt", "review", "y") if (tmp_path / "d.txt").write_text("x") else None
    with pytest.raises(ValueError, match="labels: too few rows"):
        TextClassification(path=str(tmp_path / "d.csv"), text_column="review", label_column="y", labels=None).load()
    with pytest.raises(ValueError, match="val_fraction, test_fraction"):
        TextClassification(val_fraction=0.5, test_fraction=0.5)
