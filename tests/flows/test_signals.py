"""SIGTERM and SIGINT stop `hfbatch infer` cleanly: committed shards kept, no process left behind (its
temporary Prefect server included), and the rerun completes every row exactly once."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest


def _session(sid: int) -> list[psutil.Process]:
    """Live processes of the session `sid` (the CLI was started as its leader)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_a_run_cleanly_and_the_rerun_finishes_it(classifier, data_dir, tmp_path, signum):
    # 60 shards of 20 rows, ~0.13 s each here: the signal must land while shards are still to come
    source = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 1200).select(["idx", "text"])
    path, out = tmp_path / "rows.parquet", tmp_path / "out"
    pq.write_table(source, path, row_group_size=20)
    # a store of its own: rows another test computed would be reused and the run would end before the signal
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
           "HFBATCH_STORE": str(tmp_path / "store")}
    env.pop("PREFECT_API_URL", None)  # the CLI starts a temporary Prefect server of its own
    args = [str(Path(sys.executable).parent / "hfbatch"), "infer", "--model", classifier, "--task",
            "text-classification", "--input", str(path), "--output", str(out), "--shard-rows", "20", "--json"]
    # as in a terminal, SIGINT's default action in the CLI: a shell's background job (`cmd &` without job
    # control) ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    def committed_shards(at_least: int) -> None:
        deadline = time.time() + 240
        while len(list(out.glob("_markers/*.json"))) < at_least and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)

    committed_shards(1)  # scanning the processes takes a while: before the shards that the signal must interrupt
    assert len(_session(proc.pid)) >= 2, "no temporary Prefect server was running beside the CLI"
    committed_shards(3)
    proc.send_signal(signum)  # the CLI alone, as `kill` or Ctrl-C in a terminal would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    deadline = time.time() + 30
    while _session(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _session(proc.pid), f"left behind: {[p.cmdline() for p in _session(proc.pid)]}"

    committed = {}
    for marker in out.glob("_markers/*.json"):
        part = out / json.loads(marker.read_text())["part"]
        committed[part.name] = part.stat().st_mtime_ns
    assert 3 <= len(committed) < 60 and not (out / "_manifest.json").exists()

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards"] == 60 and summary["shards_skipped"] >= len(committed)
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in committed.items())
    ids = pq.read_table(out).column("idx").to_pylist()
    assert sorted(ids) == source.column("idx").to_pylist() and len(ids) == len(set(ids))
    # the rerun's last logs reached its temporary server before it stopped (its SQLite database)
    with contextlib.closing(sqlite3.connect(tmp_path / "prefect" / "prefect.db")) as db:
        run_id, state = db.execute("SELECT id, state_name FROM flow_run ORDER BY start_time DESC LIMIT 1").fetchone()
        messages = [m for (m,) in db.execute("SELECT message FROM log WHERE flow_run_id = ?", (run_id,))]
    assert state == "Completed" and "Finished in state Completed()" in messages, messages
