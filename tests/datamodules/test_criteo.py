"""CriteoTSV against hand-written lines in Criteo's exact text format."""

from __future__ import annotations

import gzip
import logging
import math

import numpy as np
import pytest

from datamodules.ctr.criteo import CriteoTSV, CriteoTextStream, MalformedLine, parse_line
from datamodules.ctr.sharding import Reader


def line(label, ints, cats) -> str:
    return "\t".join([str(label)] + [str(i) for i in ints] + list(cats)) + "\n"


INTS = ["5", "", "-1"] + ["2"] * 10            # a missing value and a negative count
CATS = ["68fd1e64", "", "ffffffff"] + ["1"] * 23  # hex ids, one missing
LINE = line(1, INTS, CATS)


def write_lines(path, count: int) -> list[int]:
    """``count`` valid lines whose int_0 is the line number (so batches can be traced)."""
    with open(path, "w") as f:
        for n in range(count):
            f.write(line(n % 2, [n] + ["1"] * 12, [format(n, "x")] * 26))
    return list(range(count))


def test_parse_line_hand_worked():
    label, ints, cats = parse_line(LINE)
    assert label == 1
    assert ints[:3] == [5, 0, -1]
    assert cats[:3] == [0x68FD1E64, 0, 0xFFFFFFFF]
    assert cats[0] == 1761418852


def test_batch_values_dense_transform_and_hashing(tmp_path):
    path = tmp_path / "day.tsv"
    path.write_text(LINE + line(0, ["0"] * 13, ["a"] * 26))
    stream = CriteoTextStream([str(path)], 4, (1000,) * 26, None, False, "error")
    (batch,) = list(stream)
    assert batch.labels.tolist() == [1.0, 0.0]
    dense = batch.dense_features[0].tolist()
    assert dense[0] == pytest.approx(math.log(6.0))     # log(1 + 5)
    assert dense[1] == 0.0 and dense[2] == 0.0            # missing -> 0, -1 clamps to 0
    ids = batch.sparse_features.to_dict()
    assert ids["cat_0"].values().tolist() == [852, 10]    # 1761418852 % 1000, 0xa
    assert ids["cat_1"].values().tolist() == [0, 10]      # missing -> 0
    assert ids["cat_2"].values().tolist() == [295, 10]    # 4294967295 % 1000


def test_gzip_reads_the_same(tmp_path):
    plain = tmp_path / "a.tsv"
    write_lines(plain, 10)
    packed = tmp_path / "a.tsv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    read = lambda p: [b for b in CriteoTextStream([str(p)], 4, (97,) * 26, None, False, "error")]
    for a, b in zip(read(plain), read(packed), strict=True):
        assert a.indices.tolist() == b.indices.tolist()
        assert a.sparse_features.values().tolist() == b.sparse_features.values().tolist()


def test_malformed_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text(LINE + "1\t2\t3\n" + LINE)
    with pytest.raises(MalformedLine, match=r"bad.tsv:2: expected 40"):
        list(CriteoTextStream([str(path)], 8, (10,) * 26, None, False, "error"))


def test_malformed_counted_and_reported(tmp_path, caplog):
    path = tmp_path / "bad.tsv"
    path.write_text(LINE + LINE.replace("68fd1e64", "xyz") + "2" + LINE[1:] + LINE)
    stream = CriteoTextStream([str(path)], 8, (10,) * 26, None, False, "count")
    with caplog.at_level(logging.WARNING, logger="datamodules.ctr.criteo"):
        (batch,) = list(stream)
    assert batch.indices.tolist() == [0, 3]
    assert stream.malformed == 2
    assert "skipped 2 malformed lines" in caplog.text and "bad.tsv:2" in caplog.text


@pytest.mark.parametrize("world,workers,drop_last,budget,second", [
    (1, 2, True, None, "gz"), (2, 2, True, None, "gz"), (2, 3, False, None, "gz"),
    (3, 2, True, 70, "gz"), (2, 3, False, None, "plain"), (3, 2, True, 70, "plain"),
    (1, 4, True, None, "plain")])
@pytest.mark.parametrize("indexed", [False, True])
def test_sharding_no_duplicates_no_losses(tmp_path, monkeypatch, world, workers, drop_last, budget,
                                          second, indexed):
    """Readers that scan and readers that seek (line index: plain files; a gzip file after a
    plain one is scanned) read the same lines: each exactly once."""
    files = [tmp_path / "a.tsv", tmp_path / f"b.{'tsv.gz' if second == 'gz' else 'txt'}"]
    write_lines(files[0], 57)
    with open(tmp_path / "b.tsv", "w") as f:
        for n in range(57, 100):
            f.write(line(0, [n] + ["1"] * 12, ["0"] * 26))
    raw = (tmp_path / "b.tsv").read_bytes()
    files[1].write_bytes(gzip.compress(raw) if second == "gz" else raw)
    seen, per_rank = [], [0] * world
    for rank in range(world):
        for worker in range(workers):
            reader = Reader(index=worker * world + rank, count=world * workers, world_size=world)
            monkeypatch.setattr("datamodules.ctr.criteo.current_reader", lambda r=reader: r)
            stream = CriteoTextStream([str(p) for p in files], 8, (10,) * 26, budget, drop_last, "error")
            if indexed:
                stream.build_index()
                assert len(stream.index.entries) == (1 if second == "gz" else 2)
            for batch in stream:
                idx = batch.indices.tolist()
                # int_0 holds the line number: the batch really holds those lines.
                assert np.allclose(batch.dense_features[:, 0].numpy(), np.log1p(idx))
                seen += idx
                per_rank[rank] += 1
    total = budget or 100
    assert len(seen) == len(set(seen))
    if drop_last:  # whole batches only, the same count on every rank
        assert len(set(per_rank)) == 1
        assert sorted(seen) == list(range(per_rank[0] * world * 8))
        assert total - len(seen) < 8 * world
    else:
        assert sorted(seen) == list(range(total))


def test_dataloader_workers_split_lines(tmp_path):
    path = tmp_path / "a.tsv"
    write_lines(path, 50)
    dm = CriteoTSV(train_files=[str(path)], batch_size=8, hash_size=100, num_workers=2)
    seen = [i for b in dm.train_dataloader() for i in b.indices.tolist()]
    assert sorted(seen) == list(range(48))  # 6 whole batches, each line once


def test_npy_layout(tmp_path):
    rng = np.random.default_rng(0)
    for day, n in (("day_0", 20), ("day_1", 13)):
        np.save(tmp_path / f"{day}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(tmp_path / f"{day}_sparse.npy", rng.integers(0, 10**9, (n, 26)))
        np.save(tmp_path / f"{day}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
    dm = CriteoTSV(train_files=[str(tmp_path / "day_0_dense.npy")],
                   val_files=[str(tmp_path / f"day_{d}_dense.npy") for d in (0, 1)],
                   batch_size=8, hash_size=1000)
    batches = list(dm.val_dataloader())
    assert sum(len(b.labels) for b in batches) == 33
    sparse = np.concatenate([np.load(tmp_path / f"day_{d}_sparse.npy") for d in (0, 1)])
    crossing = batches[2]  # rows 16..23 span both files
    assert crossing.indices.tolist() == list(range(16, 24))
    assert crossing.sparse_features["cat_3"].values().tolist() == (sparse[16:24, 3] % 1000).tolist()
    assert len(list(dm.train_dataloader())) == 2


def test_npy_rows_read_or_gathered_equal_the_arrays(tmp_path):
    """The packed batches of consecutive rows (read with pread, across two days' files) and of
    shuffled rows (gathered from the memory maps) hold exactly the arrays' values: dense as
    stored, ids modulo the hash size per feature, labels, indices; int32 ids on disk too."""
    import torch

    from datamodules.ctr.batch import PackedBatch
    from datamodules.ctr.criteo import NpySource

    rng = np.random.default_rng(1)
    days = {"day_0": 11, "day_1": 9}
    for day, n in days.items():
        np.save(tmp_path / f"{day}_dense.npy", rng.random((n, 13), dtype=np.float32))
        ids = rng.integers(0, 2**31 - 1, (n, 26))
        np.save(tmp_path / f"{day}_sparse.npy", ids.astype(np.int32 if day == "day_1" else np.int64))
        np.save(tmp_path / f"{day}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
    hashes = tuple(range(1000, 1026))
    source = NpySource([str(tmp_path / d) for d in days], hashes)
    dense = np.concatenate([np.load(tmp_path / f"{d}_dense.npy") for d in days])
    sparse = np.concatenate([np.load(tmp_path / f"{d}_sparse.npy").astype(np.int64) for d in days])
    labels = np.concatenate([np.load(tmp_path / f"{d}_labels.npy") for d in days])[:, 0]
    for rows in (np.arange(5, 17), rng.permutation(20)[:7]):
        batch = source(rows)
        assert isinstance(batch, PackedBatch)
        assert np.array_equal(batch.dense_features.numpy(), dense[rows])
        kjt = batch.sparse_features
        assert kjt.values().dtype == torch.int64 and kjt.keys()[0] == "cat_0"
        for f in (0, 7, 25):
            assert kjt[f"cat_{f}"].values().tolist() == (sparse[rows, f] % hashes[f]).tolist()
        assert batch.labels.tolist() == labels[rows].astype(np.float32).tolist()
        assert batch.indices.tolist() == rows.tolist()


def test_packed_batch_is_make_batch_in_one_tensor():
    """pack_batch keeps make_batch's batch in one int32 tensor: the same values after
    unpacking, after .to("cpu"), and after a pickle (as a DataLoader worker sends it)."""
    import pickle

    import torch

    from datamodules.ctr.batch import PackedBatch, make_batch, pack_batch

    rng = np.random.default_rng(2)
    names = ("a", "b", "c")
    dense = rng.random((5, 4), dtype=np.float32)
    ids = rng.integers(0, 2**31 - 1, (5, 3))
    labels, indices = np.array([1, 0, 0, 1, 1]), np.arange(100, 105) * 2**33  # int64 range
    reference = make_batch(dense, ids, labels, indices, names)
    packed = pack_batch(dense, ids, labels, indices, names)
    assert packed.data.dtype == torch.int32 and packed.data.dim() == 1
    sent = pickle.loads(pickle.dumps(packed))
    for batch in (packed.unpack(), packed.to("cpu"), sent.unpack()):
        assert torch.equal(batch.dense_features, reference.dense_features)
        assert torch.equal(batch.labels, reference.labels)
        assert torch.equal(batch.indices, reference.indices)
        assert batch.sparse_features.keys() == reference.sparse_features.keys()
        assert torch.equal(batch.sparse_features.values(), reference.sparse_features.values())
        assert torch.equal(batch.sparse_features.lengths(), reference.sparse_features.lengths())
        assert batch.sparse_features.length_per_key() == [5, 5, 5]
    ids_at, labels_at, indices_at, total = PackedBatch.words(5, 4, 3)
    assert (ids_at, labels_at, indices_at, total) == (20, 35, 40, 50)  # 40: 8-byte aligned


def test_bad_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_files"):
        CriteoTSV(train_files=[str(tmp_path / "missing.tsv")])
    with pytest.raises(ValueError, match="hash_size"):
        CriteoTSV(train_files=[], hash_size=[10, 20])
    with pytest.raises(ValueError, match="hash_size must be at most 2\\*\\*31"):
        CriteoTSV(train_files=[], hash_size=2**31 + 1)


def test_shipped_mlperf_config_asks_for_train_files_before_building_the_model(capsys):
    from lit.cli import main
    from tests.conftest import CONFIGS

    # setup() runs before configure_model: the 26 x 40M x 128 tables are never partitioned.
    with pytest.raises(ValueError, match=r"--data.init_args.train_files="):
        main(["fit", "--config", str(CONFIGS / "dlrm" / "criteo_mlperf.yaml"),
              "--trainer.logger=false", "--trainer.accelerator=cpu"])


def test_nothing_to_train_on_names_the_file_or_the_sizes(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    gz = tmp_path / "empty.tsv.gz"
    gz.write_bytes(gzip.compress(b""))
    short = tmp_path / "short.tsv"
    write_lines(short, 5)
    for path in (empty, gz):
        dm = CriteoTSV(train_files=[str(short), str(path)], batch_size=4, hash_size=10)
        with pytest.raises(ValueError, match=f"{path.name} is empty"):
            dm.setup("fit")
    dm = CriteoTSV(train_files=[str(short)], batch_size=8, hash_size=10)
    with pytest.raises(ValueError, match=r"short.tsv.*5 samples, fewer than one whole batch \(batch_size 8 = 8\)"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"train_samples 3 of train_files"):
        CriteoTSV(train_files=[str(short)], batch_size=4, hash_size=10, train_samples=3).setup("fit")
    with pytest.raises(ValueError, match="train_files: no training files given"):
        CriteoTSV(train_files=[], test_files=[str(short)], hash_size=10).setup("fit")
    CriteoTSV(train_files=[], test_files=[str(short)], hash_size=10).setup("test")  # test only: fine
    CriteoTSV(train_files=[str(short)], batch_size=5, hash_size=10).setup("fit")  # one batch: fine
    with pytest.warns(UserWarning, match="val split .*val_samples 0.* is empty"):
        CriteoTSV(train_files=[str(short)], val_files=[str(short)], val_samples=0, batch_size=5,
                  hash_size=10).setup("fit")


def test_npy_files_whose_rows_disagree_are_named_at_setup(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "day_0_dense.npy", rng.random((20, 13), dtype=np.float32))
    np.save(tmp_path / "day_0_sparse.npy", rng.integers(0, 10, (19, 26)))
    np.save(tmp_path / "day_0_labels.npy", rng.integers(0, 2, (20, 1)))
    dm = CriteoTSV(train_files=[str(tmp_path / "day_0_dense.npy")], batch_size=4, hash_size=10)
    with pytest.raises(ValueError, match=r"day_0_dense.npy has 20, .*day_0_sparse.npy has 19, .*day_0_labels.npy has 20"):
        dm.setup("fit")
    np.save(tmp_path / "day_0_sparse.npy", rng.integers(0, 10, (20, 25)))
    with pytest.raises(ValueError, match=r"expected \(N, 13\), \(N, 26\)"):
        dm.setup("fit")


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "a.tsv"
    write_lines(path, 400)
    data = gzip.compress(path.read_bytes())
    bad = tmp_path / "day.tsv.gz"
    bad.write_bytes(data[: len(data) // 2])
    dm = CriteoTSV(train_files=[str(bad)], batch_size=8, hash_size=10)
    dm.setup("fit")  # the first lines read fine
    with pytest.raises(ValueError, match=r"day.tsv.gz: unreadable after line \d+ .*download or decompress it again"):
        list(dm.train_dataloader())


def test_bulk_parser_agrees_with_the_line_parser_and_defers_malformed_lines():
    """The numpy bulk parser gives parse_line's values (empties, negatives, upper-case hex,
    CRLF) and returns None for anything parse_line would reject, so those lines are reported."""
    from datamodules.ctr.criteo import parse_line, parse_lines_fast

    rng = np.random.default_rng(1)
    lines = []
    for n in range(200):
        ints, cats = rng.integers(-3, 10**6, 13), rng.integers(0, 2**32, 26)
        row = [str(n % 2)] + ["" if v % 7 == 0 else str(v) for v in ints] + \
              ["" if v % 11 == 0 else format(v, "08x") for v in cats]
        row[20] = row[20].upper()
        if n % 5 == 0:
            row[-1] = ""
        lines.append(("\t".join(row) + ("\r\n" if n % 9 == 0 else "\n")).encode())
    labels, ints, cats = parse_lines_fast(lines)
    expected = [parse_line(line.decode()) for line in lines]
    assert labels.tolist() == [e[0] for e in expected]
    assert ints.tolist() == [e[1] for e in expected]
    assert cats.tolist() == [e[2] for e in expected]
    good = lines[1]
    for bad in (b"2" + good[1:], b"\t" + good[2:], good.replace(b"\t", b"\tz", 1),
                good.replace(b"\t", b"", 1), good[:-1], good.replace(b"\t", b"\t-", 1)[:0] + b"1\t-\t" + good.split(b"\t", 2)[2]):
        assert parse_lines_fast(lines[:3] + [bad]) is None, bad


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_block_line_reader_skips_and_takes_across_blocks_and_files(tmp_path, block, monkeypatch):
    """Skipping counts newlines in blocks and taking splits lines off them: against the files'
    own lines (a last line without a newline included), for any block size, across files."""
    from datamodules.ctr.criteo import _Lines

    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv.gz"
    a.write_bytes(b"l0\nline1\n\nl3 long line\nl4")  # 5 lines, the last without a newline
    b.write_bytes(gzip.compress(b"m0\nm1\nm2\n"))
    expected = [(str(a), 1, b"l0\n"), (str(a), 2, b"line1\n"), (str(a), 3, b"\n"),
                (str(a), 4, b"l3 long line\n"), (str(a), 5, b"l4\n"),
                (str(b), 1, b"m0\n"), (str(b), 2, b"m1\n"), (str(b), 3, b"m2\n")]
    monkeypatch.setattr(_Lines, "BLOCK", block)
    for start in range(9):
        for count in (1, 2, 5):
            lines = _Lines([str(a), str(b)])
            assert lines.skip_to(start) == (start <= 8)
            assert lines.take(count) == expected[start:start + count]
            assert lines.pos == min(start + count, 8)
    assert not _Lines([str(a)]).skip_to(6)


@pytest.mark.parametrize("stride", [1, 2, 3, 8])
@pytest.mark.parametrize("gz", [False, True])
def test_line_index_seeks_to_the_same_lines_as_scanning(tmp_path, stride, gz, monkeypatch):
    """With a line index (small scan blocks, so batch starts fall in every block position),
    skipping lands on the same lines as the files' own, file:line included; the gzip file is
    not indexed (it cannot seek) and is scanned."""
    from datamodules.ctr.criteo import LineIndex, _Lines

    a, b = tmp_path / "a.tsv", tmp_path / ("b.tsv.gz" if gz else "b.tsv")
    a.write_bytes(b"l0\nline1\n\nl3 long line\nl4")  # 5 lines, the last without a newline
    b.write_bytes(gzip.compress(b"m0\nm1\nm2\n") if gz else b"m0\nm1\nm2\n")
    expected = [(str(a), 1, b"l0\n"), (str(a), 2, b"line1\n"), (str(a), 3, b"\n"),
                (str(a), 4, b"l3 long line\n"), (str(a), 5, b"l4\n"),
                (str(b), 1, b"m0\n"), (str(b), 2, b"m1\n"), (str(b), 3, b"m2\n")]
    monkeypatch.setattr(LineIndex, "BLOCK", 4)
    index = LineIndex([str(a), str(b)], stride)
    assert [e[:3] for e in index.entries] == [(0, 0, 5)] + ([] if gz else [(1, 5, 3)])
    # Hand-worked byte offsets of lines 0 .. 4 of a.tsv and 0 .. 2 of b.tsv.
    starts = {0: (0, 0), 1: (0, 3), 2: (0, 9), 3: (0, 10), 4: (0, 23),
              5: (1, 0), 6: (1, 3), 7: (1, 6)}
    for target in range(8):
        place = index.locate(target)
        if target % stride == 0 and (target < 5 or not gz):
            assert place == (starts[target][0], target - (0 if target < 5 else 5),
                             starts[target][1])
        else:
            assert place is None
    assert index.locate(8) is None
    for start in range(9):
        for count in (1, 2, 5):
            lines = _Lines([str(a), str(b)], index)
            if start > 1:  # seeking from a place already inside the stream, too
                assert lines.take(1) == expected[:1]
            assert lines.skip_to(start) == (start <= 8)
            assert lines.take(count) == expected[start:start + count]
            assert lines.pos == min(start + count, 8)
