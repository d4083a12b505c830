"""The operations loop as deployments: `watch-data` (scheduled) emits `hfbatch.dataset.updated` →
`retrain` (triggered by that event) trains, evaluates and gates a new version → `batch-inference`
(cron) predicts with whichever version is champion when it runs. `train` runs on demand.

`serve_deployments` starts them in this process (`hfbatch serve`: runs execute as subprocesses here);
`deployments/prefect.yaml` declares the same for workers (`hfbatch deploy`). Both then create or update
the alerts (`flows/alerts.py`) for the deployments: `prefect.yaml` cannot declare automations.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from uuid import UUID

from prefect.events import DeploymentEventTrigger

from hfbatch.flows.alerts import ensure_alerts, notification_block
from hfbatch.flows.inference import batch_inference
from hfbatch.flows.params import check_parameters, flow_values
from hfbatch.flows.training import train_flow
from hfbatch.flows.watch import watch_data
from hfbatch.tasks import watch
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.predictors import canonical_task

PREFECT_YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def retrain_trigger(prefix: str) -> DeploymentEventTrigger:
    """Run the deployment when `watch_data` reports new or changed files under `prefix`, training on
    the prefix the event names."""
    return DeploymentEventTrigger(name=f"retrain on {prefix}", expect={watch.EVENT},
                                  match={"prefect.resource.id": watch.resource_id(prefix)},
                                  parameters={"dataset": "{{ event.payload.prefix }}"})


def build_deployments(name: str, base_model: str, watch_prefix: str, infer_input: str, infer_output: str,
                      task: str = "text-classification", cron: str = "0 2 * * *", watch_interval: float = 300,
                      store: str | None = None, train_params: dict | None = None) -> list:
    """The deployments of the operations loop for model `name`; `train_params` are train flow options as
    the command line names them (`max_train_samples`, `question_column`, ...)."""
    train = flow_values(train_flow, {"dataset": watch_prefix, "model": base_model, "name": name, "store": store,
                                     "task": task, **(train_params or {})}, canonical_task(task))
    infer = {"model": name, "task": task, "input": infer_input, "output": infer_output, "store": store}
    check_parameters(train_flow, train)
    check_parameters(batch_inference, infer)
    return [
        watch_data.to_deployment("watch-data", interval=watch_interval,
                                 parameters={"prefix": watch_prefix, "store": store}),
        train_flow.to_deployment("retrain", parameters=train, triggers=[retrain_trigger(watch_prefix)],
                                 concurrency_limit=1, description="Retrain when new labelled data lands"),
        train_flow.to_deployment("train", parameters=train, concurrency_limit=1, description="Train on demand"),
        batch_inference.to_deployment("batch-inference", cron=cron, parameters=infer,
                                      description=f"Predict with the champion of {name}"),
    ]


def serve_deployments(deployments: list, settings: Settings | None = None) -> None:
    """Register the deployments (with their schedules and triggers), set up their alerts, and run their
    flow runs here. Triggers are evaluated by the Prefect server, so a real one is needed
    (`PREFECT_API_URL`)."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    settings = settings or Settings()
    if not PREFECT_API_URL.value():
        raise ConfigError("serving needs a Prefect server: start one (`prefect server start`) and set "
                          "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    block = notification_block(settings)
    # applied here first for their ids (serve applies them again: the same deployments, updated)
    ensure_alerts({d.name: d.apply() for d in deployments}, block, settings)
    serve(*deployments)


def deploy_all(prefect_file: Path = PREFECT_YAML, settings: Settings | None = None) -> list[str]:
    """`prefect deploy --all` of `deployments/prefect.yaml`, from the repository root (its entrypoints
    are relative to it), then the alerts of those deployments; returns the alerts' names."""
    settings = settings or Settings()
    block = notification_block(settings)  # a block asked for by name must be there before anything is deployed
    rc = subprocess.call([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                          "--prefect-file", str(prefect_file)], cwd=prefect_file.parents[1])
    if rc:
        raise ConfigError(f"prefect deploy failed (exit status {rc})")
    return ensure_alerts(deployed(prefect_file), block, settings)


def deployed(prefect_file: Path = PREFECT_YAML) -> dict[str, UUID]:
    """`{deployment name: id}` of the deployments `prefect_file` declares, as the API has them."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.utilities.importtools import import_object

    spec = yaml.safe_load(prefect_file.read_text())
    with get_client(sync_client=True) as client:
        return {d["name"]: client.read_deployment_by_name(f"{import_object(d['entrypoint']).name}/{d['name']}").id
                for d in spec["deployments"]}
