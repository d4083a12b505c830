"""`task_runner="dask"`: the shards run on a Dask LocalCluster (prefect-dask) and give exactly the
output of the thread runner; the cluster and its worker processes are gone after the run."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hfbatch.flows import inference
from hfbatch.flows.cli import main
from prefect.exceptions import ParameterTypeError


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


@pytest.mark.slow
def test_dask_local_cluster_gives_the_thread_runners_output(prefect_harness, classifier, reviews, tmp_path,
                                                           monkeypatch):
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
    params = dict(model=classifier, task="text-classification", input=str(reviews), shard_rows=40,
                  batch_tokens=2048)
    threads = inference.batch_inference(output=str(tmp_path / "threads"), **params)
    assert "cluster" not in seen
    dask = inference.batch_inference(output=str(tmp_path / "dask"), task_runner="dask", **params)

    # it really ran on a 2-worker LocalCluster, whose torch threads share the cores, and it is closed
    assert len(seen["pids"]) == 2 and os.getpid() not in seen["pids"].values()
    worker_threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert set(seen["torch_threads"].values()) == {worker_threads}
    assert seen["cluster"].status.name == "closed"
    assert _gone(seen["pids"].values()), "Dask worker processes still running"

    assert (threads["rows"], threads["rows_out"], threads["shards"]) == (dask["rows"], dask["rows_out"],
                                                                        dask["shards"]) == (220, 220, 6)
    a, b = pq.read_table(tmp_path / "threads"), pq.read_table(tmp_path / "dask")
    assert a.column_names == b.column_names == ["idx", "row_id", "label", "score", "model", "model_version"]
    assert a.column("idx").to_pylist() == list(range(220))
    for column in ("idx", "row_id", "label", "model", "model_version"):  # same rows, same order, same labels
        assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    # torch's intra-op thread count (here 2 in this process, 1 per worker) changes the reduction order
    # of some matmuls: a score may differ in its last bit (measured: 1 of 220, by 1 ulp)
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=1e-6, atol=0)

    ma, mb = (json.loads((tmp_path / name / "_manifest.json").read_text()) for name in ("threads", "dask"))
    for key in ("rows_in", "rows_out", "quarantined", "shards", "tokens", "input_fingerprint", "model_version",
                "parts"):
        assert ma[key] == mb[key], key

    # with as many torch threads as a worker has, the thread runner's table is bit-identical
    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads)
    try:
        inference.batch_inference(output=str(tmp_path / "threads-same"), **params)
    finally:
        torch.set_num_threads(before)
    assert pq.read_table(tmp_path / "threads-same").equals(b)


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
    assert "needs task_runner='dask'" in capsys.readouterr().err
    with pytest.raises(ParameterTypeError, match="task_runner: Input should be 'threads' or 'dask'"):
        inference.batch_inference(model=str(tmp_path / "m"), task="text-classification",
                                  input=str(tmp_path / "never-read.parquet"), output=str(tmp_path / "out"),
                                  task_runner="Dask")
    assert not (tmp_path / "out").exists()
