"""Shard planning: deterministic, complete, row-group aligned, and streaming reads of exactly a shard."""
from __future__ import annotations

import errno

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.batch.shards import describe_input, iter_shard_batches, list_input_files, plan_shards
from hfbatch.tasks.core.errors import ConfigError, DataError


@pytest.fixture
def parts(tmp_path):
    """Two files: 250 rows in row groups of 40, and 1,000 rows in one row group."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(250)), "text": [f"a{i}" for i in range(250)]}), d / "a.parquet",
                   row_group_size=40)
    pq.write_table(pa.table({"id": list(range(1000)), "text": [f"b{i}" for i in range(1000)]}),
                   d / "sub" / "b.parquet")
    (d / "_markers").mkdir()
    (d / "_markers" / "x.parquet").write_bytes(b"not parquet")  # skipped: underscore folders
    (d / "notes.txt").write_text("skipped: not Parquet")
    return d


def test_listing_file_directory_glob(parts):
    assert [n for _, n in list_input_files(str(parts))] == ["a.parquet", "sub/b.parquet"]
    assert [n for _, n in list_input_files(str(parts / "a.parquet"))] == ["a.parquet"]
    assert [n for _, n in list_input_files(str(parts / "*.parquet"))] == ["a.parquet"]
    with pytest.raises(DataError, match="does not exist"):
        list_input_files(str(parts / "missing"))


def test_plan_is_deterministic_and_complete(parts):
    files = describe_input(str(parts))
    plan = plan_shards(files, 100)
    assert plan == plan_shards(describe_input(str(parts)), 100)
    assert [s.fingerprint for s in plan] == [s.fingerprint for s in plan_shards(files, 100)]
    # a.parquet: whole row groups of 40 while they fit in 100 rows; b.parquet: its one row group cut in 10
    a = [(s.start, s.stop, s.rg_start, s.rg_stop) for s in plan if s.name == "a.parquet"]
    assert a == [(0, 80, 0, 2), (80, 160, 2, 4), (160, 250, 4, 7)]  # the last group of 10 rows joins
    b = [s for s in plan if s.name == "sub/b.parquet"]
    assert len(b) == 10 and all(s.num_rows == 100 and (s.rg_start, s.rg_stop) == (0, 1) for s in b)
    assert [s.index for s in plan] == list(range(len(plan)))
    assert len({s.fingerprint for s in plan}) == len(plan)
    assert sum(s.num_rows for s in plan) == 1250
    with pytest.raises(ConfigError):
        plan_shards(files, 0)


def test_fingerprint_follows_content(parts, tmp_path):
    before = plan_shards(describe_input(str(parts / "a.parquet")), 100)
    pq.write_table(pa.table({"id": list(range(250)), "text": [f"c{i}" for i in range(250)]}),
                   parts / "a.parquet", row_group_size=40)
    after = plan_shards(describe_input(str(parts / "a.parquet")), 100)
    assert [(s.start, s.stop) for s in before] == [(s.start, s.stop) for s in after]
    assert not {s.fingerprint for s in before} & {s.fingerprint for s in after}


def test_streaming_reads_exactly_the_shard(parts):
    plan = plan_shards(describe_input(str(parts)), 70)
    seen = {}
    for shard in plan:
        for rg, first, batch in iter_shard_batches(shard, ["id"], batch_rows=16):
            assert batch.num_rows <= 16
            for i, v in enumerate(batch.column("id").to_pylist()):
                key = (shard.name, v)
                assert key not in seen
                seen[key] = (rg, first + i)
    assert len(seen) == 1250
    assert seen[("a.parquet", 41)] == (1, 1)  # row 41 of a.parquet is row 1 of row group 1
    assert seen[("sub/b.parquet", 999)] == (0, 999)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        describe_input(str(bad))


def test_damaged_later_page_yields_corrupt_rows_after_the_batches_read(data_dir, tmp_path):
    """A row group whose later pages are damaged: the batches before the damage come first, then the
    shard's rows of that row group as `CorruptRows` (the caller drops those batches); without
    `skip_corrupt` a `DataError` names file and row group."""
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 60).column("text").to_pylist()
    path = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=30, data_page_size=200, write_batch_size=5,
                   compression="none", use_dictionary=False)  # several pages per row group
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data, end = bytearray(path.read_bytes()), chunk.data_page_offset + chunk.total_compressed_size
    for k in range(end - 150, end - 100):  # inside the last pages of row group 1
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    shard = plan_shards(describe_input(str(path)), 100)[0]
    seen = [(rg, first, type(b).__name__, b.num_rows)
            for rg, first, b in iter_shard_batches(shard, ["text"], batch_rows=10, skip_corrupt=True)]
    assert seen[:3] == [(0, 0, "RecordBatch", 10), (0, 10, "RecordBatch", 10), (0, 20, "RecordBatch", 10)]
    assert seen[-1] == (1, 0, "CorruptRows", 30) and all(s[2] == "RecordBatch" for s in seen[3:-1])
    with pytest.raises(DataError, match=r"corrupt Parquet data in .*pages\.parquet.*row group 1"):
        list(iter_shard_batches(shard, ["text"], batch_rows=10))


def test_file_system_errors_pass_unchanged_to_be_retried():
    """An OSError the file system raised (s3fs turns an S3 5xx into OSError(EIO, ...)) is not taken for
    damaged data: no second read, same exception, so the shard task retries it."""
    from hfbatch.tasks.batch.shards import _decoding

    error = OSError(errno.EIO, "We encountered an internal error. Please try again.")
    with pytest.raises(OSError) as info, _decoding("/nonexistent/never-read.parquet", 0, ["text"]):
        raise error
    assert info.value is error
