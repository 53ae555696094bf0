"""MovieLens100K from the installed recbole package (the real data, never copied)."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.ctr.movielens import SPARSE_NAMES, MovieLens100K


@pytest.fixture(scope="module")
def dm():
    return MovieLens100K(batch_size=128, seed=0)


def test_real_counts_and_click_rate(dm):
    t = dm.tables
    assert len(t) == 100_000
    assert t.labels.mean() == pytest.approx(0.554, abs=0.001)  # rating >= 4 (environment.md)
    assert dm.schema.cardinalities[SPARSE_NAMES.index("user_id")] == 944   # 943 users + unknown
    assert dm.schema.cardinalities[SPARSE_NAMES.index("item_id")] == 1683  # 1682 items + unknown


def test_split_disjoint_and_complete(dm):
    rows = [dm.rows[s] for s in ("train", "val", "test")]
    assert [len(r) for r in rows] == [80_000, 10_000, 10_000]
    assert len(np.unique(np.concatenate(rows))) == 100_000
    other = MovieLens100K(seed=1)
    assert not np.array_equal(other.rows["val"], dm.rows["val"])


def test_first_rating_features_by_hand(dm):
    # ml-100k.inter line 1: user 196 rated item 242 with 3 (no click). User 196: age 49, M,
    # writer, zip 55105. Item 242: "Kolya" (1996), genre Comedy.
    t = dm.tables
    assert t.labels[0] == 0.0
    assert t.dense[0].tolist() == pytest.approx([0.49, 0.96])
    assert t.ids["age_bucket"][0] == 5  # 45-49
    values, lengths = t.genres(np.array([0]))
    assert lengths.tolist() == [1]


def test_batches_are_bags(dm):
    batch = next(iter(dm.val_dataloader()))
    kjt = batch.sparse_features.to_dict()
    assert list(kjt) == list(SPARSE_NAMES)
    assert kjt["user_id"].lengths().tolist() == [1] * 128
    genres = kjt["genres"].lengths()
    assert genres.max() > 1  # multi-genre movies are bags of several ids
    assert batch.dense_features.shape == (128, 2)


def test_bad_settings():
    with pytest.raises(ValueError, match="val_fraction"):
        MovieLens100K(val_fraction=0.7, test_fraction=0.5)
    with pytest.raises(FileNotFoundError, match="recbole"):
        MovieLens100K(data_dir="/nonexistent")


def test_train_split_smaller_than_a_batch_is_an_error(dm, monkeypatch):
    monkeypatch.setattr(dm, "batch_size", 90_000)  # 80,000 training ratings
    with pytest.raises(ValueError, match=r"80000 samples, fewer than one whole batch \(batch_size 90000"):
        dm.setup("fit")
