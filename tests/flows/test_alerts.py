"""The operations team's alerts end to end: a real Prefect server (`prefect server start`, 127.0.0.1),
`hfbatch serve` creating the deployments and their automations, and a real HTTP receiver (http.server on
127.0.0.1, in a thread) as the webhook of the notification block. Each of the four alerts must arrive
with the flow run's name and its link in the UI: a failed batch-inference run, drift reported by a flow
run, a trained version the gate did not promote, and a batch-inference run not completed by its deadline
(nothing picks it up once the served process is gone). Creating the alerts again (`hfbatch deploy`)
duplicates nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.store import Store
from tests.flows.test_operations import BIN, ROOT, _api, _wait, prefect_server  # noqa: F401
from tests.flows.test_registry_ops import _register
from tests.helpers import start_process, stop_process, tiny

NAME = "alerts-sst2"
DEADLINE = 10  # seconds: Prefect's least for a proactive trigger


class Receiver:
    """A webhook: every POSTed JSON body is kept, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, what: str, words: list[str], timeout: float, logs: list[Path]) -> dict:
        """The first message whose subject holds every one of `words`."""
        found: list[dict] = []

        def arrived() -> bool:
            found[:] = [m for m in list(self.messages) if all(w in m["subject"] for w in words)]
            return bool(found)

        _wait(f"the {what} alert ({words}); got {[m['subject'] for m in self.messages]}", arrived, timeout, logs)
        return found[0]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sst2_classifier(minilm, tmp_path_factory) -> str:
    """A tiny random classifier with SST-2's label names (it is evaluated on SST-2 as the champion)."""
    return tiny(minilm, tmp_path_factory.mktemp("tiny") / "sst2", "BertForSequenceClassification",
                id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


DRIFT_FLOW = """
import sys
from prefect import flow
from prefect.events import emit_event

@flow(name="drift-check")
def drift_check(output: str) -> None:
    # what batch inference emits when its predictions drift: inside its flow run
    emit_event("hfbatch.predictions.drifted", resource={"prefect.resource.id": f"hfbatch.predictions.{output}",
                                                       "prefect.resource.name": output},
               payload={"column": "label", "psi": 0.42})

state = drift_check(sys.argv[1], return_state=True)
print(state.state_details.flow_run_id)
"""


def _run_of(env: dict, flow_run_id):
    from prefect.client.orchestration import get_client

    with _api(env), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _start_run(env: dict, deployment: str, **parameters):
    from prefect.client.orchestration import get_client

    with _api(env), get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(client.read_deployment_by_name(deployment).id,
                                                      parameters=parameters)


def _alerts(env: dict) -> tuple[list, list]:
    """(the hfbatch automations, the custom-webhook blocks) in the API."""
    from prefect.client.orchestration import get_client

    with _api(env), get_client(sync_client=True) as client:
        automations = [a for a in client.read_automations() if a.name.startswith("hfbatch: ")]
        blocks = [b for b in client.read_block_documents() if b.block_type and b.block_type.slug == "custom-webhook"]
    return automations, blocks


def _check(message: dict, run, server_url: str) -> None:
    """An alert names the run and links to its page in the UI."""
    text = message["subject"] + "\n" + message["body"]
    assert run.name in text and f"{server_url}/runs/flow-run/{run.id}" in message["body"], message


def test_the_four_alerts_arrive_with_the_run_and_its_link(prefect_server, receiver, sst2_classifier,  # noqa: F811
                                                          data_dir, tmp_path):
    env = dict(prefect_server["env"], PREFECT_RUNNER_POLL_FREQUENCY="2", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HFBATCH_DEVICE="cpu", HFBATCH_ALERT_WEBHOOK_URL=receiver.url)
    url, logs = prefect_server["url"], [tmp_path / "serve.log", prefect_server["log"]]
    store = Store(str(tmp_path / "store"))
    _register(store, NAME, "seed", 0.80, sst2_classifier)  # the champion a new version must beat
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet")
    (tmp_path / "watched").mkdir()  # stays empty: no retraining but the one started below
    pq.write_table(sst2.slice(0, 240), tmp_path / "labelled.parquet")
    pq.write_table(sst2.slice(5000, 16).select(["idx", "text"]), tmp_path / "unlabelled.parquet")

    serve = start_process([str(BIN / "hfbatch"), "serve", "--name", NAME, "--model", sst2_classifier,
                           "--watch", str(tmp_path / "watched"), "--input", str(tmp_path / "unlabelled.parquet"),
                           "--output", str(tmp_path / "predictions" / "v{model_version}"), "--store", store.url,
                           "--watch-interval", "3600", "--inference-deadline", str(DEADLINE),
                           "--train-param", "max_train_samples=200", "--train-param", "max_length=32"], env, logs[0])
    try:
        _wait("the served deployments and their alerts", lambda: len(_alerts(env)[0]) == 4, 240, logs)
        # (a) a batch-inference run fails: its input is not there
        failed = _start_run(env, "batch_inference/batch-inference", input=str(tmp_path / "missing.parquet"))
        # (c) a training whose version cannot beat the champion by the margin: registered, not promoted
        trained = _start_run(env, "train/train", dataset=str(tmp_path / "labelled.parquet"), promotion_margin=1.0)
        # (b) drift, reported from inside a flow run
        drift = subprocess.run([sys.executable, "-c", DRIFT_FLOW, str(tmp_path / "predictions")], env=env,
                               capture_output=True, text=True, timeout=180)
        assert drift.returncode == 0, drift.stderr[-3000:]
        drift_run = _run_of(env, drift.stdout.strip().splitlines()[-1])

        _check(receiver.wait_for("failed run", ["Failed", failed.name], 240, logs), failed, url)
        _check(receiver.wait_for("drift", ["drifted", drift_run.name], 120, logs), drift_run, url)
        rejected = receiver.wait_for("rejected version", [f"{NAME} v2 not promoted", trained.name], 300, logs)
        _check(rejected, trained, url)
        _wait("the training to finish", lambda: _run_of(env, trained.id).state.is_final(), 300, logs)
        assert _run_of(env, trained.id).state.is_completed()
        index = Registry(store, NAME).load()
        assert index["champion"] == "1" and not index["versions"][1]["promoted"]
        assert f"the champion stays v1: {index['versions'][1]['reason']}" in rejected["body"]  # the gate's words
    finally:
        stop_process(serve, signal.SIGINT, 20)

    # (d) nobody runs batch inference any more: the next run is late, and not completed by the deadline
    late = _start_run(env, "batch_inference/batch-inference")
    message = receiver.wait_for("late run", [f"run {late.name} not completed within {DEADLINE} s"], 180, logs)
    _check(message, late, url)
    assert _run_of(env, late.id).state.name == "Late"

    # `hfbatch deploy` (prefect.yaml's deployments, for workers elsewhere) updates the same four alerts
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with _api(env), get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    before = {a.name: a.id for a in _alerts(env)[0]}
    deploy = subprocess.run([str(BIN / "hfbatch"), "deploy", "--inference-deadline", "600"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    automations, blocks = _alerts(env)
    assert {a.name: a.id for a in automations} == before and len(blocks) == 1
    late_alert = next(a for a in automations if a.name == "hfbatch: late-inference")
    assert late_alert.trigger.within.total_seconds() == 600


@pytest.mark.parametrize("args, env_extra, message", [
    (["--alert-block", "slack-webhook/nobody"], {}, "no notification block slack-webhook/nobody in the Prefect API"),
    (["--alert-block", "hfbatch-alerts"], {}, "must be <block type slug>/<block name>"),
    (["--alert-block", "slack-webhook/ops"], {"HFBATCH_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/x"},
     "HFBATCH_ALERT_WEBHOOK_URL fills a custom-webhook block"),
    (["--inference-deadline", "5"], {}, "at least 10 seconds"),
], ids=["missing block", "no type", "url for another type", "short deadline"])
def test_alert_settings_are_checked_before_anything_is_deployed(prefect_server, args, env_extra, message,  # noqa: F811
                                                               monkeypatch, capsys):
    from prefect.client.orchestration import get_client

    from hfbatch.flows.cli import main

    for key, value in env_extra.items():
        monkeypatch.setenv(key, value)
    def state() -> tuple:
        with _api(prefect_server["env"]), get_client(sync_client=True) as client:
            return ({d.id: d.updated for d in client.read_deployments()},
                    {a.id: a.model_dump_json() for a in client.read_automations()})

    before = state()
    with _api(prefect_server["env"]):
        assert main(["deploy", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert state() == before  # nothing was deployed, no automation changed
