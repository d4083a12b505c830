"""The operations loop on a real Prefect server (`prefect server start`, SQLite, 127.0.0.1), served by
`hfbatch serve`: a labelled file lands in the watched directory → watch-data emits
`hfbatch.dataset.updated` → the retrain deployment's trigger starts a training → a version is
registered and gated → the next batch-inference run predicts with the champion. No manual step
between the file landing and the new version; every process started here is stopped here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait(what: str, check, timeout: float, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free port of 127.0.0.1 with its own SQLite database."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    log = tmp_path / "server.log"
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait("the Prefect server", healthy, 180, [log])
        yield env
    finally:
        _stop(proc)


def test_new_data_retrains_and_next_inference_uses_the_champion(prefect_server, minilm, data_dir, tmp_path):
    env = dict(prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    labelled, unlabelled, store = tmp_path / "labelled", tmp_path / "unlabelled", tmp_path / "store"
    labelled.mkdir()
    unlabelled.mkdir()
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet")
    pq.write_table(sst2.slice(5000, 40).select(["idx", "text"]), unlabelled / "batch.parquet")
    output = tmp_path / "predictions" / "{date}" / "v{model_version}"
    serve_log = tmp_path / "serve.log"
    serve = _start([str(BIN / "hfbatch"), "serve", "--name", "sst2", "--model", minilm, "--watch", str(labelled),
                    "--input", str(unlabelled), "--output", str(output), "--watch-interval", "10",
                    "--store", str(store), "--train-param", "max_train_samples=300",
                    "--train-param", "max_length=32", "--train-param", "save_steps=1000"], env, serve_log)
    registry = store / "models" / "sst2" / "registry.json"
    try:
        time.sleep(15)  # watch-data runs on an empty directory: nothing to report
        assert not registry.exists()
        pq.write_table(sst2.slice(0, 400), labelled / "day1.parquet")  # new labelled data lands
        _wait("the triggered retraining to register a version", registry.exists, 480,
              [serve_log, tmp_path / "server.log"])
        index = json.loads(registry.read_text())
        assert [v["version"] for v in index["versions"]] == ["1"] and index["champion"] == "1"

        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "batch_inference/batch-inference",
                              "--watch", "--watch-timeout", "300"], env=env, capture_output=True, text=True,
                             timeout=360)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        manifests = list((tmp_path / "predictions").glob("*/v1/_manifest.json"))
        assert len(manifests) == 1, list((tmp_path / "predictions").rglob("*"))
        manifest = json.loads(manifests[0].read_text())
        assert (manifest["model"], manifest["model_version"], manifest["rows_out"]) == ("sst2", "1", 40)

        # the event was emitted once: later looks at the same data start no other training
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            retrains = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])))
            watches = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["watch-data"])))
        assert len(retrains) == 1 and retrains[0].state.is_completed()
        assert retrains[0].parameters["dataset"] == str(labelled)  # from the event's payload
        assert len(watches) >= 3
    finally:
        _stop(serve)
