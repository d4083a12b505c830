"""Faults from outside, met as an operator meets them: an input rewritten under a run, S3 endpoints and a
Prefect API that are down or stall, a disk that fills up, a run over many small files. Each ends with the
documented exit status, one line naming what failed (and how long it was waited for), nothing mixed
marked complete, and what was committed kept."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.flows.cli import main
from hfbatch.flows.inference import progress_listener
from hfbatch.tasks.batch.output import prepare_output
from hfbatch.tasks.batch.runner import run_shard
from hfbatch.tasks.batch.shards import describe_input, input_fingerprint, plan_shards
from hfbatch.tasks.batch.spec import build_spec
from hfbatch.tasks.core.errors import ConfigError, InputChangedError
from tests.conftest import free_port
from tests.helpers import predictor_spec, resolve_model, run_local

HFBATCH = str(Path(sys.executable).parent / "hfbatch")


def _rows(data_dir, path: Path, start: int, n: int, row_group_size: int = 5) -> list[int]:
    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(start, n).select(["idx", "text"])
    pq.write_table(table, path, row_group_size=row_group_size)
    return table.column("idx").to_pylist()


def _replace(path: Path, table: pa.Table) -> None:
    """Rewrite `path` as an upstream job does: a new file renamed over the old one."""
    pq.write_table(table, str(path) + ".new", row_group_size=5)
    os.replace(str(path) + ".new", path)


@contextlib.contextmanager
def _silent_server():
    """A TCP endpoint on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def test_an_input_rewritten_between_two_shards_fails_the_shard_and_marks_nothing_complete(classifier, data_dir,
                                                                                         tmp_path):
    src, out = tmp_path / "rows.parquet", tmp_path / "out"
    _rows(data_dir, src, 0, 20)
    predictor = predictor_spec("text-classification", resolve_model(classifier))
    files = describe_input(str(src))
    spec = build_spec(predictor, str(out), files)
    shards = plan_shards(files, 5)
    prepare_output(spec, files)
    assert run_shard(shards[0], spec)["rows"] == 5
    newer = pq.read_table(data_dir / "sst2" / "train.parquet").slice(100, 20).select(["idx", "text"])
    _replace(src, newer)
    with pytest.raises(InputChangedError, match=r"rows\.parquet' changed after this run planned it"):
        run_shard(shards[1], spec)
    assert not (out / "_manifest.json").exists()
    assert len(list(out.glob("part-*.parquet"))) == 1  # the shard of the planned content, nothing of the new
    with pytest.raises(ConfigError, match="the input's content changed"):  # a resume never mixes the two
        run_local("text-classification", resolve_model(classifier), str(src), str(out), shard_rows=5)
    manifest = run_local("text-classification", resolve_model(classifier), str(src), str(out), shard_rows=5,
                         mode="overwrite")
    assert sorted(pq.read_table(out).column("idx").to_pylist()) == sorted(newer.column("idx").to_pylist())
    assert manifest["input_fingerprint"] == input_fingerprint(describe_input(str(src)))  # of the rows it holds


def test_an_input_rewritten_under_a_command_exits_2_without_a_manifest(prefect_harness, classifier, data_dir,
                                                                      tmp_path, capfd):
    src, out = tmp_path / "rows.parquet", tmp_path / "out"
    _rows(data_dir, src, 0, 60)
    newer = pq.read_table(data_dir / "sst2" / "train.parquet").slice(300, 60).select(["idx", "text"])

    def rewrite(event: dict) -> None:
        if event["done"] == 1:  # the upstream job rewrites the file after the first shard
            _replace(src, newer)

    with progress_listener(rewrite):
        code = main(["infer", "--model", classifier, "--task", "text-classification", "--input", str(src),
                     "--output", str(out), "--shard-rows", "5"])
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert "changed after this run planned it" in err and err.count("hfbatch: error:") == 1
    assert "Traceback" not in err
    assert not (out / "_manifest.json").exists()
    parts = pq.read_table(out).column("idx").to_pylist() if list(out.glob("part-*")) else []
    assert not set(parts) & set(newer.column("idx").to_pylist())  # no row of the new content


def test_ingest_refuses_a_source_rewritten_after_its_plan(classifier, data_dir, tmp_path):
    from hfbatch.tasks.core.store import Store
    from hfbatch.tasks.recipes import get_recipe
    from hfbatch.tasks.training.ingest import ingest, plan_source
    from tests.helpers import SETTINGS

    src = tmp_path / "labelled.parquet"
    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 30)
    pq.write_table(table, src)
    recipe = get_recipe("text-classification")
    options = recipe.options_class()
    planned = plan_source(str(src), options, SETTINGS)
    pq.write_table(table.slice(0, 20), src)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(InputChangedError, match="changed after this run planned it"):
        ingest(str(src), store, recipe, options, SETTINGS, source_fingerprint=planned)
    assert not list((tmp_path / "store").glob("datasets/*/_SUCCESS"))


def _hfbatch(args: list[str], env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([HFBATCH, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - started


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect"), "AWS_ACCESS_KEY_ID": "testing",
                  "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", **extra}


def test_an_s3_endpoint_with_nothing_listening_exits_3_naming_it(classifier, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    proc, seconds = _hfbatch(["infer", "--model", classifier, "--task", "text-classification", "--input",
                              "s3://hfbatch/rows/", "--output", str(tmp_path / "out")],
                             _env(tmp_path, AWS_ENDPOINT_URL=endpoint))
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("hfbatch: error:")]
    assert len(line) == 1 and endpoint in line[0] and "did not answer" in line[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and seconds < 60, seconds
    assert not (tmp_path / "out").exists()


def test_a_stalled_s3_endpoint_fails_within_the_configured_wait(classifier, tmp_path):
    with _silent_server() as endpoint:
        proc, seconds = _hfbatch(["infer", "--model", classifier, "--task", "text-classification", "--input",
                                  "s3://hfbatch/rows/", "--output", str(tmp_path / "out")],
                                 _env(tmp_path, AWS_ENDPOINT_URL=endpoint, HFBATCH_S3_READ_TIMEOUT="1",
                                      HFBATCH_S3_CONNECT_TIMEOUT="1"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("hfbatch: error:"))
    assert endpoint in line and "waiting 1 s to connect and 1 s for an answer" in line, line
    assert "HFBATCH_S3_READ_TIMEOUT" in line and "Traceback" not in proc.stderr
    # 5 tries of 1 s for each of the listing's requests, s3fs's backoff, and the command's start
    assert seconds < 45, seconds


def test_a_prefect_api_that_is_down_exits_3_and_status_still_shows_the_registry(classifier, tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["fine", "bad"]}), src)
    env = _env(tmp_path, PREFECT_API_URL=api)
    proc, seconds = _hfbatch(["infer", "--model", classifier, "--task", "text-classification", "--input", str(src),
                              "--output", str(tmp_path / "out")], env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"the Prefect API {api} did not answer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and seconds < 30
    store = tmp_path / "store"
    (store / "models" / "m").mkdir(parents=True)
    (store / "models" / "m" / "registry.json").write_text(json.dumps(
        {"name": "m", "champion": None, "versions": [], "history": []}))
    proc, _ = _hfbatch(["status", "--store", str(store)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model m: champion none" in proc.stdout and "run history: unavailable" in proc.stdout
    assert api in proc.stdout and "Traceback" not in proc.stderr


def test_a_stalled_prefect_api_is_waited_for_as_long_as_set(classifier, tmp_path):
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["fine"]}), src)
    with _silent_server() as url:
        proc, seconds = _hfbatch(["infer", "--model", classifier, "--task", "text-classification", "--input",
                                  str(src), "--output", str(tmp_path / "out")],
                                 _env(tmp_path, PREFECT_API_URL=f"{url}/api", HFBATCH_API_TIMEOUT="2"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "did not answer its health check" in proc.stderr and "HFBATCH_API_TIMEOUT=2 s" in proc.stderr
    assert seconds < 25, seconds


@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills up: a 400 KB tmpfs (needs root; skipped where it cannot be mounted)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_an_output_disk_that_fills_up_exits_3_naming_the_file_and_the_resume_finishes(prefect_harness, classifier,
                                                                                     data_dir, tmp_path,
                                                                                     small_disk, capfd):
    src = tmp_path / "rows.parquet"
    rows = _rows(data_dir, src, 0, 400, row_group_size=20)
    (small_disk / "fill").write_bytes(b"\0" * 330_000)  # what else the disk holds
    argv = ["infer", "--model", classifier, "--task", "text-classification", "--input", str(src), "--output",
            str(small_disk / "out"), "--shard-rows", "20"]
    assert main(argv) == 3
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("hfbatch: error:"))
    assert "no space left on the device writing" in line and str(small_disk / "out") in line, err[-3000:]
    assert "Traceback" not in err and not (small_disk / "out" / "_manifest.json").exists()
    committed = len(list((small_disk / "out" / "_markers").glob("*.json")))
    assert 0 < committed < 20
    (small_disk / "fill").unlink()  # space is freed: the rerun computes only what is missing
    assert main(argv) == 0
    manifest = json.loads((small_disk / "out" / "_manifest.json").read_text())
    assert manifest["shards_skipped"] == committed and manifest["rows_out"] == 400
    assert sorted(pq.read_table(small_disk / "out").column("idx").to_pylist()) == sorted(rows)


def test_a_result_store_disk_that_fills_up_exits_3_naming_the_file_and_the_rerun_repairs_it(
        prefect_harness, classifier, data_dir, tmp_path, small_disk, capfd):
    """The results kept for reuse live in the store: a store on a full disk fails the run the way a full
    output disk does (exit 3, one line naming the file); a shard whose results were not kept is not marked
    done, so the rerun computes it and keeps them, and a later run reuses every row."""
    src = tmp_path / "rows.parquet"
    _rows(data_dir, src, 0, 400, row_group_size=20)
    (small_disk / "fill").write_bytes(b"\0" * 370_000)
    argv = ["infer", "--model", classifier, "--task", "text-classification", "--input", str(src), "--shard-rows",
            "20", "--store", str(small_disk / "store")]
    assert main([*argv, "--output", str(tmp_path / "one")]) == 3
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("hfbatch: error:"))
    assert "no space left on the device writing" in line and str(small_disk / "store") in line, err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "one" / "_manifest.json").exists()
    (small_disk / "fill").unlink()
    assert main([*argv, "--output", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "_manifest.json").read_text())["rows_out"] == 400
    assert main([*argv, "--output", str(tmp_path / "two")]) == 0
    manifest = json.loads((tmp_path / "two" / "_manifest.json").read_text())
    assert (manifest["rows_reused"], manifest["rows_computed"]) == (400, 0)


def test_a_run_over_many_small_files_ends_without_a_traceback(classifier, data_dir, tmp_path):
    """A fresh process with its temporary Prefect server, over 40 files: exit 0 and a clean stderr."""
    src = tmp_path / "many"
    src.mkdir()
    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 120).select(["idx", "text"])
    for i in range(40):
        pq.write_table(table.slice(3 * i, 3), src / f"part-{i:03d}.parquet")
    proc, _ = _hfbatch(["infer", "--model", classifier, "--task", "text-classification", "--input", str(src),
                        "--output", str(tmp_path / "out")], _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["rows_out"] == 120
