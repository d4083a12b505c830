"""The Prefect events hfbatch emits about a model name: its champion changed, a new version was
registered and not promoted, or a batch-inference run's predictions drifted from the version's
reference. All concern the resource `hfbatch.model.<name>`; emitted inside a flow or
task run, Prefect adds that run as a related resource, so an automation's notification can name and
link the run (`{{ flow_run.name }}`, `{{ flow_run|ui_url }}`)."""
from __future__ import annotations

import getpass
import socket

from prefect.events import emit_event

from hfbatch.tasks.core.registry import Registration

PROMOTED = "hfbatch.model.promoted"
REJECTED = "hfbatch.model.rejected"
DRIFTED = "hfbatch.predictions.drifted"


def model_resource(name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"hfbatch.model.{name}", "prefect.resource.name": name}


def operator() -> str:
    """Who runs this process: `user@host` (what a promotion by hand records as its author)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def emit_promoted(name: str, change: dict):
    """`hfbatch.model.promoted` for a history entry of the registry (`Registry.set_champion`, or the
    gate's promotion at registration): the new champion, the one before, why, and who or what did it."""
    return emit_event(PROMOTED, resource=model_resource(name),
                      payload={"name": name, "version": change["champion"], "previous": change["previous"],
                               "reason": change["reason"], "action": change.get("action", "gate"),
                               "by": change.get("by", "the registration gate")})


def emit_rejected(reg: Registration):
    """`hfbatch.model.rejected`: `reg` was registered and not promoted (the champion stays)."""
    return emit_event(REJECTED, resource=model_resource(reg.name),
                      payload={"name": reg.name, "version": reg.version, "champion": reg.champion,
                               "reason": reg.reason, "metrics": reg.metrics})


def emit_drifted(name: str, run: dict):
    """`hfbatch.predictions.drifted`: the batch-inference run `run` (`monitoring.run_record`) of model
    `name` predicted unlike the version's reference: the figures above the threshold and every PSI."""
    return emit_event(DRIFTED, resource=model_resource(name),
                      payload={"name": name, "version": run["version"], "output": run["output"],
                               "drifted": run["drifted"], "psi": run["drift"], "rows": run["rows"]})
