import json

import pytest

from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import MARKER, Store


def test_staging_commits_marker_last_and_failed_block_leaves_nothing(tmp_path):
    store = Store(str(tmp_path / "store"))
    with store.staging("things/a", meta={"rows": 3}) as tmp:
        (tmp / "data.txt").write_text("hello")
    assert store.is_complete("things/a")
    assert (tmp_path / "store/things/a/data.txt").read_text() == "hello"
    assert store.read_json(f"things/a/{MARKER}") == {"rows": 3}

    with pytest.raises(RuntimeError), store.staging("things/b") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert not store.exists("things/b") and not store.is_complete("things/b")
    assert list((tmp_path / "store/_staging").iterdir()) == []


def test_directory_without_marker_is_not_complete_and_is_replaced(tmp_path):
    store = Store(str(tmp_path))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "stale.bin").write_text("partial")
    assert not store.is_complete("x")
    with pytest.raises(FileNotFoundError, match="not a complete artifact"):
        store.local_dir("x")
    with store.staging("x") as tmp:
        (tmp / "new.bin").write_text("full")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [MARKER, "new.bin"]


def test_write_json_is_atomic_and_readable(tmp_path):
    store = Store(str(tmp_path))
    store.write_json("a/b.json", {"k": [1, 2]})
    store.write_json("a/b.json", {"k": [3]})
    assert json.loads((tmp_path / "a/b.json").read_text()) == {"k": [3]}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_s3_store_round_trip(s3, tmp_path):
    store = Store("s3://hfbatch/store", cache_dir=tmp_path / "cache")
    assert not store.is_local
    with store.staging("models/m/1", meta={"v": 1}) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x00" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "cfg.json").write_text("{}")
    assert store.is_complete("models/m/1")
    assert store.list("models/m") == ["1"]
    local = store.local_dir("models/m/1")
    assert (local / "weights.bin").read_bytes() == b"\x00" * 1000
    assert (local / "sub" / "cfg.json").read_text() == "{}"
    assert store.local_dir("models/m/1") == local  # cached, not fetched twice


def test_s3_settings_from_a_prefect_block(prefect_harness, s3, monkeypatch):
    """Endpoint and credentials from a saved RemoteFileSystem block, none from the environment."""
    from prefect.filesystems import RemoteFileSystem

    RemoteFileSystem(basepath="s3://hfbatch", settings={
        "key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3.endpoint}}).save("hfbatch-s3")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HFBATCH_STORAGE_BLOCK", "hfbatch-s3")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    store = Store.open(Settings(), "s3://hfbatch/via-block")
    assert store.options["client_kwargs"] == {"endpoint_url": s3.endpoint}
    store.write_json("x/meta.json", {"ok": True})
    assert store.read_json("x/meta.json") == {"ok": True}  # reached moto: no AWS_* left to find it
