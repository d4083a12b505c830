"""`task_runner="dask"`: the shards run on a Dask LocalCluster (prefect-dask), or on a cluster started
as separate processes as an operator runs one (`--dask-address`), and give exactly the output of the
thread runner, even with a worker killed mid-run; the cluster and its worker processes are gone after
the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.exceptions import ParameterTypeError

from hfbatch.flows import inference
from hfbatch.flows.cli import main
from tests.conftest import free_port
from tests.helpers import call_flow, start_process, stop_process

BIN = Path(sys.executable).parent
# every run computes its rows (none reused from another's results): what these tests compare is the compute
PARAMS = dict(task="text-classification", shard_rows=40, batch_tokens=2048, reuse_results=False)


@pytest.fixture(scope="module")
def reviews(data_dir, tmp_path_factory) -> Path:
    """200 SST-2 phrases and 20 long IMDb reviews, interleaved; row groups of 40 (6 shards of 40 rows)."""
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 200).column("text").to_pylist()
    for i, t in enumerate(pq.read_table(data_dir / "imdb" / "test_sample.parquet").slice(0, 20)
                          .column("text").to_pylist()):
        texts.insert(9 * i + 4, t)
    path = tmp_path_factory.mktemp("reviews") / "reviews.parquet"
    pq.write_table(pa.table({"idx": list(range(len(texts))), "text": texts}), path, row_group_size=40)
    return path


def _gone(pids, timeout: float = 15.0) -> bool:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def threads_run(prefect_harness, classifier, reviews, tmp_path_factory) -> tuple[dict, Path]:
    """The thread runner's summary and output: what every Dask run must give."""
    out = tmp_path_factory.mktemp("threads") / "out"
    return call_flow(inference.batch_inference, model=classifier, input=str(reviews), output=str(out), **PARAMS), out


@pytest.mark.slow
def test_dask_local_cluster_gives_the_thread_runners_output(prefect_harness, classifier, reviews, threads_run,
                                                           tmp_path, monkeypatch):
    import torch

    seen = {}
    real_shard_runner = inference.shard_runner

    @contextmanager
    def spy(task_runner="threads", dask_address=None):
        with real_shard_runner(task_runner, dask_address) as runner:
            yield runner
            if task_runner == "dask":  # every shard is done: ask the workers who they were
                seen["cluster"] = runner._cluster
                seen["pids"] = runner.client.run(os.getpid)
                seen["torch_threads"] = runner.client.run(torch.get_num_threads)

    monkeypatch.setattr(inference, "shard_runner", spy)
    params = dict(model=classifier, input=str(reviews), **PARAMS)
    threads, threads_out = threads_run
    dask = call_flow(inference.batch_inference, output=str(tmp_path / "dask"), task_runner="dask", **params)

    # it really ran on a 2-worker LocalCluster, whose torch threads share the cores, and it is closed
    assert len(seen["pids"]) == 2 and os.getpid() not in seen["pids"].values()
    worker_threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert set(seen["torch_threads"].values()) == {worker_threads}
    assert seen["cluster"].status.name == "closed"
    assert _gone(seen["pids"].values()), "Dask worker processes still running"

    assert (threads["rows"], threads["rows_out"], threads["shards"]) == (dask["rows"], dask["rows_out"],
                                                                        dask["shards"]) == (220, 220, 6)
    a, b = pq.read_table(threads_out), pq.read_table(tmp_path / "dask")
    assert a.column_names == b.column_names == ["idx", "row_id", "label", "score", "model", "model_version"]
    assert a.column("idx").to_pylist() == list(range(220))
    for column in ("idx", "row_id", "label", "model", "model_version"):  # same rows, same order, same labels
        assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    # torch's intra-op thread count (here 2 in this process, 1 per worker) changes the reduction order
    # of some matmuls: a score may differ in its last bit (measured: 1 of 220, by 1 ulp)
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=1e-6, atol=0)

    ma, mb = (json.loads((out / "_manifest.json").read_text()) for out in (threads_out, tmp_path / "dask"))
    for key in ("rows_in", "rows_out", "quarantined", "shards", "tokens", "input_fingerprint", "model_version",
                "parts"):
        assert ma[key] == mb[key], key

    # with as many torch threads as a worker has, the thread runner's table is bit-identical
    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads)
    try:
        call_flow(inference.batch_inference, output=str(tmp_path / "threads-same"), **params)
    finally:
        torch.set_num_threads(before)
    assert pq.read_table(tmp_path / "threads-same").equals(b)


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes (each under its nanny, with one task thread and
    one torch thread) on free ports of 127.0.0.1, as an operator starts them; a client to watch them.
    The scheduler gives up on a task at the first worker that dies under it (`allowed-failures` 0; with
    Dask's default, 3, it would reassign it by itself first), so a kill reaches hfbatch's own retry."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                            "--no-dashboard"], dict(env, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0"),
                           tmp_path / "scheduler.log")]
    try:
        procs += [start_process([BIN / "dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                 "--no-dashboard", "--name", f"worker-{i}"], env, tmp_path / f"worker-{i}.log")
                  for i in range(2)]
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
            yield address, client
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        assert _gone([proc.pid for proc in procs])


@pytest.mark.slow
def test_a_dask_worker_killed_mid_run_loses_no_row(prefect_harness, classifier, reviews, threads_run, dask_cluster,
                                                  tmp_path):
    """`hfbatch infer --dask-address` on the cluster above; once a shard is committed, a worker with a
    shard in hand is killed (SIGKILL, as the out-of-memory killer does). The shard it held is submitted
    again and runs on a live worker: the run completes with the thread runner's rows, each exactly once,
    and a killed attempt the Prefect API recorded shows as Crashed."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL

    address, watch = dask_cluster
    out = tmp_path / "out"
    proc = subprocess.Popen([BIN / "hfbatch", "infer", "--model", classifier, "--input", reviews, "--output", out,
                             "--shard-rows", "40", "--batch-tokens", "2048", "--task", "text-classification",
                             "--task-runner", "dask", "--dask-address", address, "--json", "--no-reuse-results"],
                            env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed, deadline = None, time.time() + 300
        while killed is None and proc.poll() is None and time.time() < deadline:
            busy = [w for w, keys in watch.processing().items() if keys] if list(out.glob("_markers/*.json")) else []
            if busy:
                killed = watch.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert killed, f"no worker had a shard in hand after the first one was committed\n{stderr[-3000:]}"
    assert proc.returncode == 0, stderr[-3000:]
    assert "lost with its Dask worker (KilledWorker" in stderr and _gone([killed])

    summary, (_, threads_out) = json.loads(stdout), threads_run
    assert (summary["rows"], summary["rows_out"], summary["shards"]) == (220, 220, 6)
    a, b = pq.read_table(threads_out), pq.read_table(out)
    assert b.column("idx").to_pylist() == list(range(220))  # every row, once, in order
    for column in ("row_id", "label", "model_version"):
        assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=1e-6, atol=0)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows_in"], manifest["rows_out"], manifest["quarantined"]) == (220, 220, 0)

    def shard_states() -> dict[str, list[str]]:
        with get_client(sync_client=True) as client:
            run = next(r for r in client.read_flow_runs() if r.parameters.get("output") == str(out))
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        states: dict[str, list[str]] = {}
        for task_run in runs:
            states.setdefault(task_run.name, []).append(task_run.state.name if task_run.state else "?")
        return states

    deadline = time.time() + 60  # task run states reach the API as events: let the last ones land
    while not (states := shard_states()) or any("Completed" not in s for s in states.values()):
        assert time.time() < deadline, states
        time.sleep(1)
    assert sorted(states) == [f"shard-{i}" for i in range(6)]
    # each shard completed once; a killed attempt the API heard of is Crashed, not Running for ever (a
    # worker killed before its first state event reached the API leaves no run to mark)
    assert all(s.count("Completed") == 1 and set(s) <= {"Completed", "Crashed"} for s in states.values()), states


def test_unknown_task_runner_is_a_config_error(prefect_harness, tmp_path, capsys):
    code = main(["infer", "--model", str(tmp_path / "m"), "--task", "text-classification",
                 "--input", str(tmp_path / "never-read.parquet"), "--output", str(tmp_path / "out"),
                 "--task-runner", "ray"])
    assert code == 2
    assert "argument --task-runner: invalid choice: 'ray'" in capsys.readouterr().err
    code = main(["infer", "--model", str(tmp_path / "m"), "--task", "text-classification",
                 "--input", str(tmp_path / "never-read.parquet"), "--output", str(tmp_path / "out"),
                 "--dask-address", "tcp://127.0.0.1:8786"])
    assert code == 2
    assert "needs --task-runner dask" in capsys.readouterr().err
    with pytest.raises(ParameterTypeError, match="task_runner: Input should be 'threads' or 'dask'"):
        call_flow(inference.batch_inference, model=str(tmp_path / "m"), task="text-classification",
                                  input=str(tmp_path / "never-read.parquet"), output=str(tmp_path / "out"),
                                  task_runner="Dask")
    assert not (tmp_path / "out").exists()
