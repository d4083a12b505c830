"""What the Prefect UI shows of a model: metric tables, the task's detail tables, the registration, the
training-loss curve (a PNG embedded in markdown) and the model card, as artifacts with stable keys."""
from __future__ import annotations

import base64
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from hfbatch.tasks.core import monitoring, plots
from hfbatch.tasks.core.card import interval_text
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.refs import EvalResult
from hfbatch.tasks.core.registry import Registration, Registry, aliases_of
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.metrics import paired


def slug(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100] or "hfbatch"


def publish_eval_artifacts(result: EvalResult, key: str) -> None:
    """`<key>-metrics` (a table) and an artifact for each of the evaluation's detail tables
    (`<key>-per-class`, `-confusion-matrix`, `-per-type`, `-samples`, `-examples`)."""
    prefix = slug(key)
    create_table_artifact(key=f"{prefix}-metrics", description=f"Metrics of {result.model} ({result.num_rows} rows)",
                          table=[{"metric": k, "value": round(v, 4),
                                  "95 % interval": interval_text(result.intervals.get(k))}
                                 for k, v in result.metrics.items()])
    for suffix, (kind, content) in detail_artifacts(result.details).items():
        description = f"{suffix.replace('-', ' ').capitalize()} of {result.model}"
        if kind == "table":
            create_table_artifact(key=f"{prefix}-{suffix}", table=content, description=description)
        else:
            create_markdown_artifact(key=f"{prefix}-{suffix}", markdown=content, description=description)


def detail_artifacts(details: dict) -> dict[str, tuple[str, Any]]:
    """`{key suffix: ("table" | "markdown", content)}` of the detail tables an evaluation recorded
    (`Recipe.compute_metrics`): per class and a confusion matrix (classification), per entity type (NER),
    examples (QA), samples (generation)."""
    out: dict[str, tuple[str, Any]] = {}
    if "per_class" in details:
        per_class = details["per_class"]
        out["per-class"] = ("table", [
            {"label": name, **{m: round(v[name], 4) for m, v in per_class.items() if m != "support"},
             "support": per_class["support"][name]} for name in per_class["support"]])
    if "confusion_matrix" in details:
        names, matrix = details["confusion_matrix"]["labels"], details["confusion_matrix"]["matrix"]
        head = "| reference \\ predicted | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1)
        rows = [f"| **{n}** | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(names, matrix)]
        png = base64.b64encode(plots.confusion_png(names, matrix)).decode()
        out["confusion-matrix"] = ("markdown", f"# Confusion matrix\n\n![Confusion matrix](data:image/png;base64,"
                                               f"{png})\n\n" + "\n".join([head, *rows]))
    if "per_type" in details:
        out["per-type"] = ("table", [{"entity type": name, **{m: round(v[m], 4) for m in ("precision", "recall", "f1")},
                                      "number": v["number"]} for name, v in sorted(details["per_type"].items())])
    if "examples" in details:
        out["examples"] = ("table", [{"id": e["id"], "prediction": e["prediction"],
                                      "answers": " | ".join(dict.fromkeys(e["answers"]))} for e in details["examples"]])
    if "samples" in details:
        out["samples"] = ("table", details["samples"])
    return out


def publish_registration(reg: Registration) -> None:
    create_markdown_artifact(
        key=f"{slug(reg.name)}-registration",
        markdown=f"# {reg.name} v{reg.version}\n\n- promoted: **{reg.promoted}** (champion: v{reg.champion})\n"
                 f"- reason: {reg.reason}\n- location: `{reg.uri}`\n",
        description=f"Registration of {reg.name} v{reg.version}")


def publish_champion_history(name: str, index: dict, limit: int = 20) -> str:
    """`<name>-champion`: the champion, the aliases and the last `limit` champion changes (gate
    promotions, promotions and rollbacks by hand, with who did them and why). Returns the markdown."""
    aliases = aliases_of(index)
    markdown = "\n".join([f"# {name}: champion v{aliases['champion']}", "",
                          ", ".join(f"{alias}: " + (f"v{v}" if v else "none") for alias, v in aliases.items()), "",
                          *_history_table(index, limit)]) + "\n"
    create_markdown_artifact(key=f"{slug(name)}-champion", markdown=markdown,
                             description=f"Champion of {name} and its history")
    return markdown


def _history_table(index: dict, limit: int) -> list[str]:
    """The last `limit` champion changes, newest first, as markdown table lines."""
    return _table(["time", "action", "champion", "previous", "by", "reason"],
                  [[h["time"][:19], h.get("action", "gate"), f"v{h['champion']}",
                    f"v{h['previous']}" if h["previous"] else "-", h.get("by", "the registration gate"), h["reason"]]
                   for h in reversed(index["history"][-limit:])])


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)]


def publish_dashboard(name: str, index: dict, runs: list[dict], store: Store | None = None, limit: int = 10) -> str:
    """`<name>-dashboard`: the metric trend across versions (a PNG), the versions, the champion history
    and the last `limit` batch-inference runs with rows/s, rows, quarantine and drift. Published after
    every registration, promotion, rollback and batch-inference run of the name. Returns the markdown.
    With the registry's `store`, the trend is drawn once per set of versions (`metric_trend`)."""
    png = metric_trend(name, index["versions"], store)
    champion = index["champion"]
    versions = [[f"v{v['version']}" + (" (champion)" if v["version"] == champion else ""), v["created"][:19],
                 paired.metrics_text(v["metrics"], v.get("intervals")),
                 "yes" if v["promoted"] else "no", v["reason"]] for v in reversed(index["versions"][-limit:])]
    inference = [[r["time"][:19], r.get("flow_run") or "-", f"v{r['version']}", r["rows"], r.get("rows_reused", 0),
                  f"{r.get('seconds_saved', 0.0):.1f} s", r["rows_per_s"],
                  r.get("input_tokens", 0), r.get("output_tokens", 0), r.get("tokens_per_s", 0.0),
                  f"{100 * r['quarantine_rate']:.2f} %", f"{max(r['drift'].values(), default=0.0):.3f}",
                  ", ".join(r["drifted"]) or ("none" if r.get("reference") else "no reference")]
                 for r in reversed(runs[-limit:])]
    markdown = "\n".join([
        f"# {name}", "", f"champion: v{champion}" if champion else "no champion", "",
        f"![Metrics of {name} by version](data:image/png;base64,{base64.b64encode(png).decode()})", "",
        "## Versions", "", *_table(["version", "registered", "metrics", "promoted", "reason"], versions), "",
        "## Champion history", "", *_history_table(index, limit), "",
        "## Drift", "", drift_section(name, index, runs[-limit:], store), "",
        "## Batch inference", "",
        *(_table(["time", "flow run", "model", "rows", "reused", "compute saved", "rows/s", "tokens in",
                  "tokens out", "tokens/s", "quarantined", "max PSI", "drifted"], inference)
          if inference else ["no batch-inference runs recorded yet"]), ""])
    create_markdown_artifact(key=f"{slug(name)}-dashboard", markdown=markdown,
                             description=f"{name}: metrics, champion history, batch inference and drift")
    return markdown


def drift_section(name: str, index: dict, runs: list[dict], store: Store | None) -> str:
    """The drift chart of the last `runs` (`plots.drift_png`: PSI per figure over the runs, category shares
    of the reference and the latest run) as embedded markdown, kept in `store` by what it shows."""
    if not any(r.get("reference") for r in runs):
        return "no drift recorded yet (no batch-inference run of a version with a reference)"
    latest = next(r for r in reversed(runs) if r.get("reference"))
    version: dict = next((v for v in index["versions"] if v["version"] == latest["version"]), {})
    reference = monitoring.summary(version["reference"]) if version.get("reference") else None
    shown = [r for r in runs if r.get("reference")]
    key = f"models/{name}/_charts/drift-{digest('drift', TREND_VERSION, name, shown, reference)}.png"
    if store is not None and store.exists(key):
        png = store.fs.cat_file(store.path(key))
    else:
        png = plots.drift_png(shown, reference, monitoring.DRIFT_PSI, name)
        if store is not None:
            store.write_bytes(key, png)
    return f"![Drift of {name} over its last runs](data:image/png;base64,{base64.b64encode(png).decode()})"


TREND_VERSION = 1  # of the chart metric_trend_png draws: a new version draws every chart again


def metric_trend(name: str, versions: list[dict], store: Store | None = None) -> bytes:
    """The metric-trend PNG of `versions`, kept in `store` under a key made of what it shows
    (`models/<name>/_charts/`): an inference run, which adds a run and not a version, republishes the
    dashboard without matplotlib (0.35 s to import, 0.1 s to draw, on every `hfbatch infer`)."""
    title = f"{name}: metrics by version"
    if store is None:
        return plots.metric_trend_png(versions, title)
    shown = [{k: v.get(k) for k in ("version", "metrics", "promoted")} for v in versions]
    key = f"models/{name}/_charts/metric-trend-{digest('metric-trend', TREND_VERSION, title, shown)}.png"
    if store.exists(key):
        return store.fs.cat_file(store.path(key))
    png = plots.metric_trend_png(versions, title)
    store.write_bytes(key, png)
    return png


def publish_training_artifacts(store: Store, name: str, version: str) -> dict[str, str]:
    """The training-loss curve and the model card of the registered version `name` v`version` as
    markdown artifacts with stable keys `<name>-loss-curve` and `<name>-model-card`.

    The curve is rendered from the version's `train_log.json` and written to the store as
    `models/<name>/<version>/loss_curve.png`; the artifact embeds it as a `data:image/png` URI (both
    Prefect UIs render those in markdown, so the dashboard needs no access to the store) and names
    the PNG's store URI. Returns {artifact key: artifact markdown}.
    """
    version_key = Registry(store, name).version_key(version)
    title, prefix = f"{name} v{version}", slug(name)
    log_key = f"{version_key}/train_log.json"
    log_history = store.read_json(log_key) if store.exists(log_key) else []
    png = plots.loss_curve_png(log_history, title=f"{title}: training loss")
    png_key = f"{version_key}/loss_curve.png"
    store.write_bytes(png_key, png)
    curve = loss_curve_markdown(title, log_history, png, store.uri(png_key))
    card = card_markdown(store.fs.cat_file(store.path(f"{version_key}/README.md")).decode())
    artifacts = {f"{prefix}-loss-curve": curve, f"{prefix}-model-card": card}
    create_markdown_artifact(key=f"{prefix}-loss-curve", markdown=curve, description=f"Training loss of {title}")
    create_markdown_artifact(key=f"{prefix}-model-card", markdown=card, description=f"Model card of {title}")
    return artifacts


def loss_curve_markdown(title: str, log_history: list[dict], png: bytes, png_uri: str) -> str:
    points, mean = plots.loss_points(log_history), plots.final_train_loss(log_history)
    lines = [f"# {title}: training loss", "",
             f"![Training loss of {title}](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    if points:
        lines.append(f"- logged loss: {points[0][1]:.4f} at step {points[0][0]} → {points[-1][1]:.4f} "
                     f"at step {points[-1][0]} ({len(points)} points)")
    else:
        lines.append("- no per-step loss logged (fewer steps than `logging_steps`)")
    if mean is not None:
        lines.append(f"- mean training loss: {mean:.4f}")
    lines.append(f"- PNG in the store: `{png_uri}`")
    return "\n".join(lines) + "\n"


def card_markdown(card: str) -> str:
    """A model card (README.md) for a markdown renderer: its YAML front matter, which a renderer
    would show as a heading, becomes a YAML code block."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            return f"```yaml\n{card[4:end + 1]}```\n{card[end + 5:]}"
    return card
