"""`--report-to`: a training's parameters, losses and eval metrics in MLflow (a real `mlflow server` started
here on 127.0.0.1) and TensorBoard (its event files read back), and a tracker that is down losing nothing."""
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.core.refs import EvalResult
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.training import tracking
from hfbatch.tasks.training.ingest import ingest
from hfbatch.tasks.training.tokenization import tokenize
from hfbatch.tasks.training.train import TrainConfig, train
from tests.conftest import free_port
from tests.helpers import start_process, stop_process

TC = get_recipe("text-classification")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite backend, local artifacts), stopped after the module."""
    where = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_process([Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", port,
                          "--backend-store-uri", f"sqlite:///{where}/mlflow.db", "--artifacts-destination",
                          where / "artifacts", "--workers", "1"], dict(os.environ), where / "server.log")
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while tracking.unreachable(uri):
        assert proc.poll() is None and time.monotonic() < deadline, (where / "server.log").read_text()[-3000:]
        time.sleep(1)
    yield uri
    stop_process(proc)


def _training(tmp_path, minilm, sst2_split, **config):
    store, settings, options = Store(str(tmp_path / "store")), Settings(), TC.options_class()
    model = resolve_model(minilm, settings)
    data = tokenize(ingest(str(sst2_split[1]), store, TC, options, settings), model, store, TC, options, settings, 32)
    return store, train(data, model, store, TC, options, TrainConfig(max_train_samples=48, batch_size=16, **config),
                        settings)


def test_mlflow_gets_the_runs_parameters_losses_and_registered_version(mlflow_server, tmp_path, minilm, sst2_split,
                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hfbatch-test")
    store, trained = _training(tmp_path, minilm, sst2_split, report_to="mlflow")
    assert trained.tracker["name"] == "mlflow" and "error" not in trained.tracker
    run_id = trained.tracker["run_id"]

    evaluation = EvalResult(store=store.url, key="evals/x", model="m", model_fingerprint="f", dataset_fingerprint="E",
                            num_rows=800, label_names=("neg", "pos"), metrics={"accuracy": 0.75})
    registration = Registry(store, "sst2").register(trained, evaluation)
    assert Registry(store, "sst2").load()["versions"][0]["tracker"]["run_id"] == run_id
    tracking.record_registration(trained.tracker, "sst2", registration.version, evaluation.metrics, registration.uri)

    run = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] and run.data.params["per_device_train_batch_size"] == "16"
    losses = MlflowClient(tracking_uri=mlflow_server).get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]  # a 3-step run logs every step
    assert run.data.metrics["eval_accuracy"] == 0.75 and run.data.tags["hfbatch.model"] == "sst2@1"


def test_a_tracker_that_is_down_loses_nothing(tmp_path, minilm, sst2_split, monkeypatch, caplog):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        store, trained = _training(tmp_path, minilm, sst2_split, report_to="mlflow", seed=7)
    assert trained.global_step == 3 and store.is_complete(trained.key)  # trained and committed
    assert trained.tracker["error"].startswith("unreachable") and time.monotonic() - started < 120
    assert f"experiment tracker mlflow at {down} is unreachable" in caplog.text
    assert tracking.record_registration(trained.tracker, "m", "1", {"accuracy": 0.5}, "uri") == trained.tracker

    # a tracker that fails during training is dropped at its first error, once
    from transformers import TrainerCallback

    class Failing(TrainerCallback):
        def on_log(self, *args, **kwargs):
            raise ConnectionError("the tracker went away")

    record = {"name": "mlflow"}
    guarded = tracking.Guarded(Failing(), record)
    guarded.on_log(None, None, None, logs={})
    guarded.on_log(None, None, None, logs={})
    assert record["error"] == "ConnectionError: the tracker went away"
    assert caplog.text.count("the tracker went away") == 1


def test_tensorboard_event_files_hold_the_losses(tmp_path, minilm, sst2_split):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, trained = _training(tmp_path, minilm, sst2_split, report_to="tensorboard", seed=11)
    assert trained.tracker == {"name": "tensorboard", "logging_dir": "runs"}
    events = EventAccumulator(str(store.local_dir(trained.key) / "runs")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_unreachable_names_the_reason(tmp_path):
    assert tracking.unreachable(str(tmp_path / "mlruns")) is None  # a local file store needs no server
    assert tracking.unreachable(f"http://127.0.0.1:{free_port()}")  # refused at once
