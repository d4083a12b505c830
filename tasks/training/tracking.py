"""Experiment tracking where users look (`--report-to`): the Trainer's own integrations (MLflow,
TensorBoard, trackio), guarded so that a tracker that is down never loses a training.

The MLflow run is started here, before training, so that its id is known: the Trainer's `MLflowCallback`
logs the parameters and losses into it, and registration adds the eval metrics and the registered version
(`record_registration`). TensorBoard's event files go into the model directory (`runs/`), so they are
committed with the model, registered with its version and shown by the Hub's training-metrics tab. A tracker
that cannot be reached when training starts is left out; one that fails during training is dropped at its
first error; either way the training goes on, and the record (`TrainedModel.tracker`) says what happened.
"""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from transformers import TrainerCallback

from hfbatch.tasks.core.errors import ConfigError

log = logging.getLogger(__name__)
TRACKERS = ("none", "tensorboard", "mlflow", "trackio")
PROBE_TIMEOUT_S = 5.0


def tracking_uri() -> str:
    """Where MLflow logs: `MLFLOW_TRACKING_URI`, else its default (a local `mlruns` directory)."""
    import mlflow

    return mlflow.get_tracking_uri()


def unreachable(uri: str) -> str | None:
    """Why an MLflow tracking server at `uri` cannot be used now (its `/health` within `PROBE_TIMEOUT_S`), or
    None (reachable, or a local file store)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as answer:
            return None if answer.status == 200 else f"HTTP {answer.status}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


class Guarded(TrainerCallback):
    """A tracker's callback whose first error is said once and ends its tracking, not the training."""

    def __init__(self, inner: TrainerCallback, record: dict):
        self.inner, self.record = inner, record

    def _call(self, event: str, *args, **kwargs):
        if "error" in self.record:
            return None
        try:
            return getattr(self.inner, event)(*args, **kwargs)
        except Exception as e:  # a tracker's failure of any kind: the training goes on without it
            self.record["error"] = f"{type(e).__name__}: {e}"[:500]
            log.warning("experiment tracker %s failed (%s): training goes on without it", self.record["name"],
                        self.record["error"])
            return None


for _event in [n for n in dir(TrainerCallback) if n.startswith("on_")]:
    setattr(Guarded, _event, lambda self, *a, _e=_event, **k: self._call(_e, *a, **k))


def start(report_to: str, model_dir: Path, run_name: str) -> tuple[list[TrainerCallback], dict | None]:
    """The callbacks that report a training to `report_to` and the tracker's record (None for `none`):
    `{"name", "uri" | "logging_dir", "run_id", "error"}`. Only the first process of a distributed training
    reports."""
    if report_to == "none" or int(os.environ.get("RANK", 0)) != 0:
        return [], None
    from transformers.integrations import integration_utils

    if report_to not in integration_utils.INTEGRATION_TO_CALLBACK:
        raise ConfigError(f"--report-to {report_to!r}: not a tracker the Trainer knows ({', '.join(TRACKERS)})")
    record: dict = {"name": report_to}
    try:
        callback = integration_utils.INTEGRATION_TO_CALLBACK[report_to]()
    except (RuntimeError, ImportError) as e:
        raise ConfigError(f"--report-to {report_to}: {e} (pip install {report_to})") from e
    if report_to == "tensorboard":
        callback.logging_dir = str(model_dir / "runs")
        record["logging_dir"] = "runs"
    elif report_to == "mlflow":
        import mlflow

        record["uri"] = tracking_uri()
        problem = unreachable(record["uri"])
        if problem:
            record["error"] = f"unreachable: {problem}"
            log.warning("experiment tracker mlflow at %s is unreachable (%s): training goes on without it",
                        record["uri"], problem)
            return [], record
        try:
            run = mlflow.start_run(run_name=run_name)  # the callback logs into it and leaves it open
        except Exception as e:  # a tracker's failure of any kind: the training goes on without it
            record["error"] = f"{type(e).__name__}: {e}"[:500]
            log.warning("experiment tracker mlflow at %s failed (%s): training goes on without it", record["uri"],
                        record["error"])
            return [], record
        record["run_id"] = run.info.run_id
    return [Guarded(callback, record)], record


def finish(record: dict | None) -> None:
    """End the MLflow run `start` opened (its figures so far kept)."""
    if record and record["name"] == "mlflow" and record.get("run_id"):
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == record["run_id"]:
            mlflow.end_run()


def record_registration(record: dict | None, name: str, version: str, metrics: dict, uri: str) -> dict | None:
    """Add a registered version's eval metrics and name to the MLflow run that trained it; returns the record
    with any error said (a tracker that is down now loses the link, not the registration)."""
    if not record or record["name"] != "mlflow" or not record.get("run_id") or "error" in record:
        return record
    problem = unreachable(record["uri"])
    if problem:
        log.warning("experiment tracker mlflow at %s is unreachable (%s): %s v%s is not linked to run %s",
                    record["uri"], problem, name, version, record["run_id"])
        return {**record, "error": f"unreachable at registration: {problem}"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=record["uri"])
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(record["run_id"], f"eval_{key}", float(value))
    client.set_tag(record["run_id"], "hfbatch.model", f"{name}@{version}")
    client.set_tag(record["run_id"], "hfbatch.model_uri", uri)
    return record
