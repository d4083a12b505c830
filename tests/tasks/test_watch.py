"""watch_data: a change under a prefix is reported once, whoever looks next; the state lives in the store."""
from __future__ import annotations

import pyarrow.parquet as pq

from hfbatch.tasks import watch
from hfbatch.tasks.core.store import Store


def _write(data_dir, path, start: int, n: int) -> None:
    pq.write_table(pq.read_table(data_dir / "sst2" / "train.parquet").slice(start, n), path)


def test_changes_reported_once_and_remembered_in_the_store(data_dir, tmp_path):
    prefix, store = tmp_path / "labelled", Store(str(tmp_path / "store"))
    prefix.mkdir()
    _write(data_dir, prefix / "day1.parquet", 0, 50)
    files = watch.scan(str(prefix))
    first = watch.changes(store, str(prefix), files)
    assert first["added"] == [str(prefix / "day1.parquet")] and not first["changed"]
    watch.record(store, str(prefix), files)
    assert watch.changes(Store(str(tmp_path / "store")), str(prefix), watch.scan(str(prefix)))["added"] == []

    _write(data_dir, prefix / "day1.parquet", 0, 10)  # rewritten with other content
    _write(data_dir, prefix / "day2.parquet", 50, 50)
    second = watch.changes(store, str(prefix), watch.scan(str(prefix)))
    assert second["added"] == [str(prefix / "day2.parquet")] and second["changed"] == [str(prefix / "day1.parquet")]
    assert second["fingerprint"] != first["fingerprint"] and watch.event_id(second) != watch.event_id(first)


def test_watch_data_flow_emits_only_for_new_content(prefect_harness, data_dir, tmp_path):
    from hfbatch.flows.watch import watch_data

    prefix, store = tmp_path / "labelled", str(tmp_path / "store")
    prefix.mkdir()
    _write(data_dir, prefix / "a.parquet", 0, 50)
    assert watch_data(str(prefix), store)["emitted"] is True
    again = watch_data(str(prefix), store)
    assert again["emitted"] is False and again["added"] == again["changed"] == [] and again["files"] == 1
    _write(data_dir, prefix / "b.parquet", 50, 50)
    third = watch_data(str(prefix), store)
    assert third["emitted"] is True and third["added"] == [str(prefix / "b.parquet")]
    (prefix / "b.parquet").unlink()
    removed = watch_data(str(prefix), store)  # a removal alone retrains nothing
    assert removed["emitted"] is False and removed["removed"] == [str(prefix / "b.parquet")]
