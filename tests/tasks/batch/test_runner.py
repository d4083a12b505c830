"""Running shards exactly once: bad rows, corrupt files and pages, schema errors, SIGKILL, S3 and its outages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.engine.predictor import PredictorSpec
from hfbatch.tasks.predictors import get_predictor_class
from tests.helpers import call_flow, resolve_model, run_local


@pytest.fixture
def with_bad_rows(data_dir, tmp_path) -> Path:
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 60).column("text").to_pylist()
    texts[13], texts[44], texts[45] = None, "", "   "
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=30)
    return path


def test_bad_rows_quarantined(classifier, with_bad_rows, tmp_path):
    manifest = run_local("text-classification", resolve_model(classifier), str(with_bad_rows),
                         str(tmp_path / "out"), shard_rows=30, on_bad_row="quarantine")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["quarantined"]) == (60, 57, 3)
    quarantine = pq.read_table(tmp_path / "out" / "_quarantine")
    assert quarantine.column("row_id").to_pylist() == ["bad.parquet:0:13", "bad.parquet:1:14", "bad.parquet:1:15"]
    assert quarantine.column("reason").to_pylist() == ["null 'text'", "empty 'text'", "empty 'text'"]
    assert (quarantine.column("row_group").to_pylist(), quarantine.column("row").to_pylist()) == \
           ([0, 1, 1], [13, 14, 15])
    ids = pq.read_table(tmp_path / "out").column("row_id").to_pylist()
    assert len(ids) == 57 and "bad.parquet:0:13" not in ids


def test_corrupt_file_quarantined_or_named(classifier, with_bad_rows, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(with_bad_rows.read_bytes())
    (folder / "b.parquet").write_bytes(b"PAR1 truncated upload" + with_bad_rows.read_bytes()[:300])
    with pytest.raises(DataError, match=r"corrupt or unreadable Parquet file .*b\.parquet"):
        run_local("text-classification", resolve_model(classifier), str(folder), str(tmp_path / "fail"))
    out = tmp_path / "out"
    manifest = run_local("text-classification", resolve_model(classifier), str(folder), str(out), shard_rows=30,
                         on_bad_row="quarantine")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["quarantined"]) == (60, 57, 3)
    assert [c["file"] for c in manifest["corrupt_files"]] == ["b.parquet"]
    files = pq.read_table(out / "_quarantine" / "_files.parquet").to_pylist()
    assert [f["file"] for f in files] == ["b.parquet"] and "corrupt or unreadable" in files[0]["reason"]
    assert pq.read_table(out / "_quarantine").num_rows == 3  # the row parts only
    assert pq.read_table(out).num_rows == 57


def test_corrupt_data_page_named_or_its_row_group_quarantined(classifier, data_dir, tmp_path):
    """A valid footer over a damaged page header (Arrow raises a plain OSError, as for a broken network
    read): the same error on a second read makes it corrupt data. `fail` names the file and row group;
    `quarantine` sets that row group's rows aside (row ids, reason) and predicts the rest."""
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 60).column("text").to_pylist()
    clean = tmp_path / "clean.parquet"
    pq.write_table(pa.table({"text": texts}), clean, row_group_size=30)
    data = bytearray(clean.read_bytes())
    chunk = pq.ParquetFile(clean).metadata.row_group(1).column(0)
    for k in range(chunk.data_page_offset, chunk.data_page_offset + 40):
        data[k] ^= 0xFF
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "damaged.parquet").write_bytes(bytes(data))
    model = resolve_model(classifier)
    with pytest.raises(DataError, match=r"(?s)corrupt Parquet data in .*damaged\.parquet.*row group 1.*second read"):
        run_local("text-classification", model, str(tmp_path / "in"), str(tmp_path / "fail"), shard_rows=30)
    assert len(list((tmp_path / "fail").glob("part-*.parquet"))) == 1  # row group 0 committed, kept

    manifest = run_local("text-classification", model, str(tmp_path / "in"), str(tmp_path / "out"),
                         shard_rows=30, on_bad_row="quarantine")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["quarantined"]) == (60, 30, 30)
    quarantine = pq.read_table(tmp_path / "out" / "_quarantine")
    assert quarantine.column("row_id").to_pylist() == [f"damaged.parquet:1:{i}" for i in range(30)]
    assert all("corrupt Parquet data" in r and "row group 1" in r for r in quarantine.column("reason").to_pylist())
    ids = pq.read_table(tmp_path / "out").column("row_id").to_pylist()
    assert sorted(ids) == sorted(f"damaged.parquet:0:{i}" for i in range(30))


def test_bad_row_fails_naming_file_row_group_and_row(classifier, with_bad_rows, tmp_path):
    with pytest.raises(DataError, match=r"bad\.parquet.*row group 0, row 13 .*null 'text'"):
        run_local("text-classification", resolve_model(classifier), str(with_bad_rows), str(tmp_path / "out"),
                  shard_rows=30)


def test_schema_errors_before_any_model_load(classifier, mixed, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the schema was checked")

    monkeypatch.setattr(PredictorSpec, "load", no_load)
    monkeypatch.setattr(get_predictor_class("text-classification"), "__init__", no_load)
    model = resolve_model(classifier)
    with pytest.raises(DataError, match=r"no column 'sentence'.*columns: \['idx', 'text'\]"):
        run_local("text-classification", model, str(mixed), str(tmp_path / "a"), text_column="sentence")
    with pytest.raises(DataError, match="no column"):
        run_local("text-classification", model, str(mixed), str(tmp_path / "b"), keep_columns=["nope"])
    with pytest.raises(DataError, match="'idx' .* is int64, not a string"):
        run_local("text-classification", model, str(mixed), str(tmp_path / "c"), text_column="idx")
    with pytest.raises(DataError, match=r"no column 'context' \(input 'context' of question-answering\)"):
        run_local("question-answering", model, str(mixed), str(tmp_path / "e"), columns={"question": "text"})
    with pytest.raises(ConfigError, match="has inputs"):
        run_local("question-answering", model, str(mixed), str(tmp_path / "f"), columns={"text": "text"})
    with pytest.raises(ConfigError, match="unsupported task"):
        run_local("image-segmentation", model, str(mixed), str(tmp_path / "d"))


def _hfbatch(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hfbatch.flows.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_rerun_is_exactly_once(classifier, data_dir, tmp_path):
    """Kill a real `hfbatch infer` (and its Prefect server) once some shards are committed; the rerun
    computes only the rest, and every input id is in the output exactly once."""
    source = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 900).select(["idx", "text"])
    path = tmp_path / "sst2.parquet"
    pq.write_table(source, path, row_group_size=30)
    out = tmp_path / "out"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    args = ["infer", "--model", classifier, "--task", "text-classification", "--input", str(path),
            "--output", str(out), "--shard-rows", "30", "--json"]
    proc = _hfbatch(args, env)
    deadline = time.time() + 180
    while len(list(out.glob("_markers/*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    committed = {}
    for marker in out.glob("_markers/*.json"):
        part = out / json.loads(marker.read_text())["part"]
        committed[part.name] = (part.stat().st_ino, part.stat().st_mtime_ns)
    assert 3 <= len(committed) < 30, f"kill came too late or too early: {len(committed)} of 30 shards done"
    assert not (out / "_manifest.json").exists()

    proc = _hfbatch(args, env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["shards"] == 30 and summary["shards_skipped"] >= len(committed)
    for name, stat in committed.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat, f"{name} was recomputed"
    ids = pq.read_table(out).column("idx").to_pylist()
    assert sorted(ids) == list(range(900)) and len(ids) == len(set(ids))
    assert len(list(out.glob("part-*.parquet"))) == 30


def test_s3_input_and_output(prefect_harness, s3, classifier, mixed):
    import s3fs

    from hfbatch.flows.inference import batch_inference

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    fs.put(str(mixed), "hfbatch/input/day=1/mixed.parquet")
    summary = call_flow(batch_inference, model=classifier, task="text-classification", input="s3://hfbatch/input/",
                              output="s3://hfbatch/predictions", shard_rows=100)
    assert (summary["rows"], summary["rows_out"], summary["shards"]) == (230, 230, 3)
    files = sorted(fs.glob("hfbatch/predictions/part-*.parquet"))
    assert len(files) == 3 and fs.exists("hfbatch/predictions/_manifest.json")
    result = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])
    assert result.column("idx").to_pylist() == list(range(230))
    assert result.column("row_id").to_pylist()[0] == "day=1/mixed.parquet:0:0"
    local = run_local("text-classification", resolve_model(classifier), str(mixed), "s3://hfbatch/again",
                      shard_rows=100)
    again = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in sorted(fs.glob("hfbatch/again/part-*"))])
    assert local["rows_out"] == 230 and again.column("label").equals(result.column("label"))
    rerun = call_flow(batch_inference, model=classifier, task="text-classification", input="s3://hfbatch/input",
                            output="s3://hfbatch/predictions", shard_rows=100)
    assert rerun["shards_skipped"] == 3


class RestartableS3:
    """moto's S3 server on 127.0.0.1, in this process so its objects outlive a restart of the server (as a
    real S3 service's data outlives a restart of its front end). `stop()` closes the listening socket and
    every open connection: clients get refused or reset until `start()` listens on the same port again."""

    def __init__(self):
        from tests.conftest import free_port

        self.port, self.server, self.conns = free_port(), None, []
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> RestartableS3:
        import threading

        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app),
                                  threaded=True)
        accept = self.server.get_request

        def get_request():
            conn, addr = accept()
            self.conns.append(conn)
            return conn, addr

        self.server.get_request = get_request
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        import socket

        self.server.shutdown()  # the accept loop ends and closes the listening socket
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []


def test_s3_server_restart_mid_run_is_carried_by_retries(prefect_harness, classifier, mixed, monkeypatch):
    """The S3 server stops for 4 s once some shards are committed (connections refused and reset), then
    starts again: retries (botocore's, then the task's) carry the run through, every row is in the
    output once."""
    import socket
    import threading

    import boto3
    import s3fs

    from hfbatch.flows.inference import batch_inference

    server = RestartableS3().start()
    outage = {}

    def restart_mid_run(client):
        deadline = time.time() + 120
        while time.time() < deadline:
            listed = client.list_objects_v2(Bucket="hfbatch", Prefix="predictions/_markers/")
            if listed.get("KeyCount", 0) >= 3:
                outage["markers_before"] = listed["KeyCount"]
                server.stop()
                time.sleep(4)
                try:  # really down: connections are refused
                    socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                except ConnectionRefusedError:
                    outage["refused"] = True
                server.start()
                outage["restarted"] = True
                return
            time.sleep(0.05)

    try:
        for name, value in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=server.endpoint)
        client.create_bucket(Bucket="hfbatch")
        fs = s3fs.S3FileSystem()
        fs.put(str(mixed), "hfbatch/input/mixed.parquet")
        restarter = threading.Thread(target=restart_mid_run, args=(client,), daemon=True)
        restarter.start()
        summary = call_flow(batch_inference, model=classifier, task="text-classification", input="s3://hfbatch/input",
                                  output="s3://hfbatch/predictions", shard_rows=10)
        restarter.join(10)
        assert outage.get("restarted") and outage.get("refused") and outage["markers_before"] < 23, f"the restart missed the run: {outage}"
        assert (summary["rows"], summary["rows_out"], summary["shards"]) == (230, 230, 23)
        parts = sorted(fs.glob("hfbatch/predictions/part-*.parquet"))
        ids = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in parts]).column("idx").to_pylist()
        assert ids == list(range(230)) and len(parts) == 23
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
