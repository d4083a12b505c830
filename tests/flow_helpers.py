"""Reading what a flow run did back from the Prefect API."""
from __future__ import annotations

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId


def task_states(flow_run_id) -> dict[str, list[str]]:
    """{task name: [state name of each of its runs]} for one flow run, e.g. {"ingest": ["Cached"]}."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def artifact_keys() -> set[str]:
    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts() if a.key}
