"""`hfbatch status`: the registry's champions and metric trends, and the last flow runs from the Prefect API."""
from __future__ import annotations

import json
from typing import Any

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.registry import Registry, aliases_of
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.metrics.paired import metrics_text

SUMMARY_KEY = "batch-inference-summary"  # the artifact of a batch_inference run's figures
SUMMARY_FIELDS = ("rows", "rows_reused", "seconds_saved", "rows_per_s", "input_tokens", "output_tokens",
                  "tokens_per_s", "model", "model_version")


def collect_status(settings: Settings, store: str | None = None, limit: int = 5, runs: bool = True) -> dict:
    """The status as a JSON-serialisable dict: `models` from the store's registry, `flows` from the API
    (None without `runs`: the registry alone needs neither Prefect nor a server)."""
    s = Store.open(settings, store)
    return {"store": s.url, "models": model_status(s), "flows": run_status(limit) if runs else None}


def model_status(store: Store) -> list[dict]:
    """Per registered name: its champion, aliases (champion, challenger, previous) and champion history
    (gate promotions, promotions and rollbacks by hand), every version's metrics, promotion and time,
    and the recorded batch-inference runs (rows, speed, quarantine, drift), oldest first."""
    models = []
    for name in store.list("models"):
        try:
            registry = Registry(store, name)
        except ConfigError:  # not a model name: nothing the registry wrote
            continue
        if not registry.exists():
            continue
        index = registry.load()
        versions = [{"version": v["version"], "task": v.get("task", "text-classification"),
                     "created": v["created"], "metrics": v["metrics"], "intervals": v.get("intervals", {}),
                     "promoted": v["promoted"], "champion": v["version"] == index["champion"]}
                    for v in index["versions"]]
        champion = registry.champion()
        models.append({"name": name, "champion": champion and {k: champion.get(k) for k in (
            "version", "created", "metrics", "intervals", "base_model", "uri", "reason")}, "versions": versions,
            "aliases": aliases_of(index),
            "history": [{"action": "gate", "by": "the registration gate", **h} for h in index["history"]],
            "inference": [{k: r.get(k, 0) for k in ("time", "flow_run", "version", "rows", "rows_per_s",
                                                    "input_tokens", "output_tokens", "tokens_per_s", "rows_reused",
                                                    "seconds_saved", "quarantine_rate", "drift", "drifted",
                                                    "reference")}
                          for r in registry.runs()]})
    return models


def run_status(limit: int = 5) -> list[dict]:
    """The last `limit` started runs of each deployment, and of each flow's runs outside a deployment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    groups: list[dict[str, Any]] = []
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        for flow in sorted(client.read_flows(), key=lambda f: f.name):
            targets = [(d.name, FlowRunFilterDeploymentId(any_=[d.id]))
                       for d in sorted(deployments, key=lambda d: d.name) if d.flow_id == flow.id]
            for deployment, by_deployment in [*targets, (None, FlowRunFilterDeploymentId(is_null_=True))]:
                runs = client.read_flow_runs(
                    flow_filter=FlowFilter(id=FlowFilterId(any_=[flow.id])),
                    flow_run_filter=FlowRunFilter(deployment_id=by_deployment,
                                                  start_time=FlowRunFilterStartTime(is_null_=False)),
                    sort=FlowRunSort.START_TIME_DESC, limit=limit)
                if runs or deployment:
                    groups.append({"flow": flow.name, "deployment": deployment,
                                   "runs": [_run(r) for r in runs]})
        ids = [r["id"] for g in groups for r in g["runs"]]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
                                           flow_run_id=ArtifactFilterFlowRunId(any_=ids)),
            sort=ArtifactSort.CREATED_DESC) if ids else []
    summaries: dict[str, Any] = {}
    for a in artifacts:  # newest first: a run's latest summary wins
        table: Any = json.loads(a.data) if isinstance(a.data, str) else a.data
        summaries.setdefault(str(a.flow_run_id), table[0] if table else {})
    for run in (r for g in groups for r in g["runs"]):
        if run["id"] in summaries:
            run.update({k: summaries[run["id"]].get(k) for k in SUMMARY_FIELDS})
    return groups


def _run(run) -> dict:
    seconds = (run.total_run_time if run.end_time else run.estimated_run_time).total_seconds()
    return {"id": str(run.id), "name": run.name, "state": run.state.name if run.state else None,
            "start_time": run.start_time.isoformat() if run.start_time else None,
            "duration_s": round(seconds, 1)}


def format_status(status: dict) -> str:
    """The status as text for a terminal."""
    lines = [f"store {status['store']}"]
    if not status["models"]:
        lines.append("  no registered models")
    for m in status["models"]:
        champ = m["champion"]
        lines.append(f"\nmodel {m['name']}: champion " + (
            f"v{champ['version']} ({metrics_text(champ['metrics'], champ['intervals'])})" if champ else "none"))
        for v in m["versions"]:
            mark = "*" if v["champion"] else "+" if v["promoted"] else " "
            shown = metrics_text(v["metrics"], v["intervals"])
            lines.append(f"  {mark} v{v['version']:<4} {v['created'][:19]}  {shown}")
        aliases = {k: v for k, v in m.get("aliases", {}).items() if v and k != "champion"}
        if aliases:
            lines.append("  aliases: " + ", ".join(f"{k} v{v}" for k, v in aliases.items()))
        for h in m.get("history", [])[-3:]:
            was = f" (was v{h['previous']})" if h["previous"] else ""
            lines.append(f"  {h['time'][:19]}  {h['action']:<8} → v{h['champion']}{was} by {h['by']}: {h['reason']}")
        for r in m.get("inference", [])[-3:]:
            drift = (f"drifted: {', '.join(r['drifted'])}" if r["drifted"] else "no drift") if r["reference"] \
                else "no reference"
            lines.append(f"  {r['time'][:19]}  inference v{r['version']}: {r['rows']} rows, {r['rows_per_s']} rows/s, "
                         f"{r['rows_reused']} rows reused ({r['seconds_saved']:.1f} s of compute saved), "
                         f"tokens in {r['input_tokens']} out {r['output_tokens']} ({r['tokens_per_s']}/s), "
                         f"{100 * r['quarantine_rate']:.2f} % quarantined, max PSI "
                         f"{max(r['drift'].values(), default=0.0):.3f} ({drift})")
    if status["models"]:
        lines.append("  (* champion, + promoted earlier)")
    lines.append("")
    if status.get("runs_unavailable"):
        lines.append(f"run history: unavailable ({status['runs_unavailable']})")
    elif status["flows"] is None:
        lines.append("run history: needs a Prefect server (set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api)")
    elif not status["flows"]:
        lines.append("no flow runs in the Prefect API")
    for g in status["flows"] or []:
        lines.append(f"flow {g['flow']}" + (f", deployment {g['deployment']}" if g["deployment"] else ""))
        if not g["runs"]:
            lines.append("    no runs")
        for r in g["runs"]:
            line = (f"    {r['name']:<28} {r['state'] or '?':<10} {(r['start_time'] or '')[:19]}"
                    f"  {r['duration_s']:>8.1f} s")
            if "rows" in r:
                line += f"  {r['rows']} rows, {r['rows_per_s']} rows/s, {r['model']} {r['model_version']}, " \
                        f"{r.get('rows_reused') or 0} rows reused " \
                        f"({r.get('seconds_saved') or 0:.1f} s of compute saved)"
                if r.get("output_tokens"):
                    line += f", tokens in {r['input_tokens']} out {r['output_tokens']} ({r['tokens_per_s']}/s)"
            lines.append(line)
    return "\n".join(lines)

