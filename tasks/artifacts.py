"""What the Prefect UI shows of a model: metric tables, the task's detail tables, the registration, the
training-loss curve (a PNG embedded in markdown) and the model card, as artifacts with stable keys."""
from __future__ import annotations

import base64

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from . import plots
from .recipes import Recipe
from .refs import EvalResult
from .registry import Registration, Registry
from .store import Store


def slug(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100] or "hfbatch"


def publish_eval_artifacts(result: EvalResult, recipe: Recipe, key: str) -> None:
    """`<key>-metrics` (a table) and the recipe's detail artifacts (`<key>-per-class`, ...)."""
    prefix = slug(key)
    create_table_artifact(key=f"{prefix}-metrics", description=f"Metrics of {result.model} ({result.num_rows} rows)",
                          table=[{"metric": k, "value": round(v, 4)} for k, v in result.metrics.items()])
    for suffix, (kind, content) in recipe.detail_artifacts(result.details, result.label_names).items():
        description = f"{suffix.replace('-', ' ').capitalize()} of {result.model}"
        if kind == "table":
            create_table_artifact(key=f"{prefix}-{suffix}", table=content, description=description)
        else:
            create_markdown_artifact(key=f"{prefix}-{suffix}", markdown=content, description=description)


def publish_registration(reg: Registration) -> None:
    create_markdown_artifact(
        key=f"{slug(reg.name)}-registration",
        markdown=f"# {reg.name} v{reg.version}\n\n- promoted: **{reg.promoted}** (champion: v{reg.champion})\n"
                 f"- reason: {reg.reason}\n- location: `{reg.uri}`\n",
        description=f"Registration of {reg.name} v{reg.version}")


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
