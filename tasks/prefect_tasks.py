"""Prefect task wrappers: caching, retries and artifacts around the plain functions of this package.

Every task's cache key is the content key of its output in the store, and its result is persisted
in the store's `prefect-results/`, so a cache hit in one process is a hit in every process and on
every machine that uses the same store.
"""
from __future__ import annotations

import base64
from dataclasses import asdict

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.tasks import exponential_backoff

from . import evaluation, ingest as ingest_mod, plots, registry, tokenization, train as train_mod
from .errors import HfbatchError
from .fingerprint import digest
from .store import Store


def result_storage(store: Store):
    """The Prefect result storage inside `store`, saved as a block named after the store (Prefect
    requires result storage to be a saved block so that any worker can read the results back)."""
    if store.is_local:
        block = LocalFileSystem(basepath=store.uri("prefect-results"))
    else:
        block = RemoteFileSystem(basepath=store.uri("prefect-results"), settings=store.options)
    block.save(f"hfbatch-results-{digest(store.url)[:16]}", overwrite=True)
    return block


def is_transient(task, task_run, state) -> bool:
    """Retry only errors that may pass (network, S3, a killed worker), never bad input."""
    try:
        state.result()
    except HfbatchError:
        return False
    except Exception:
        return True
    return False


def _key(name: str):
    def cache_key(context, parameters):
        parts = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in parameters.items()}
        return f"{name}-{digest(name, parts)}"

    return cache_key


IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                  retry_jitter_factor=0.5, retry_condition_fn=is_transient)
CACHED = dict(persist_result=True, cache_expiration=None)


@task(name="ingest", cache_key_fn=_key("ingest"), **CACHED, **IO_RETRIES)
def ingest_task(src: str, store_url: str, source_fingerprint: str, text_column: str = "text",
                label_column: str = "label", label_names: tuple[str, ...] | None = None):
    return ingest_mod.ingest(src, Store(store_url), text_column, label_column, label_names, source_fingerprint)


@task(name="holdout", cache_key_fn=_key("holdout"), **CACHED, **IO_RETRIES)
def holdout_task(data, store_url: str, fraction: float, seed: int):
    return ingest_mod.holdout(data, Store(store_url), fraction, seed)


@task(name="tokenize", cache_key_fn=_key("tokenize"), **CACHED, **IO_RETRIES)
def tokenize_task(data, model, store_url: str, max_length: int):
    return tokenization.tokenize(data, model, Store(store_url), max_length)


@task(name="train", cache_key_fn=_key("train"), **CACHED, retries=1, retry_delay_seconds=10,
      retry_condition_fn=is_transient)
def train_task(data, model, store_url: str, config: train_mod.TrainConfig):
    """Fine-tune; a retry (or a rerun after a crash) resumes from the last checkpoint in the store."""
    return train_mod.train(data, model, Store(store_url), config)


@task(name="evaluate", cache_key_fn=_key("evaluate"), **CACHED, **IO_RETRIES)
def evaluate_task(model, data, store_url: str, metrics: tuple[str, ...], artifact_key: str | None = None):
    result = evaluation.evaluate_model(model, data, Store(store_url), metrics)
    if artifact_key:
        publish_eval_artifacts(result, artifact_key)
    return result


@task(name="register", cache_key_fn=_key("register"), **CACHED, **IO_RETRIES)
def register_task(trained, evaluated, store_url: str, name: str, metric: str, margin: float,
                  champion_score: float | None):
    store = Store(store_url)
    reg = registry.Registry(store, name).register(trained, evaluated, metric, margin, champion_score)
    create_markdown_artifact(
        key=f"{_slug(name)}-registration",
        markdown=f"# {name} v{reg.version}\n\n- promoted: **{reg.promoted}** (champion: v{reg.champion})\n"
                 f"- reason: {reg.reason}\n- location: `{reg.uri}`\n",
        description=f"Registration of {name} v{reg.version}")
    publish_training_artifacts(store, name, reg.version)
    return reg


def publish_eval_artifacts(result: evaluation.EvalResult, key: str) -> None:
    """Metrics table, per-class table and confusion matrix as Prefect artifacts with stable keys."""
    slug = _slug(key)
    create_table_artifact(key=f"{slug}-metrics", description=f"Metrics of {result.model} ({result.num_rows} rows)",
                          table=[{"metric": k, "value": round(v, 4)} for k, v in result.metrics.items()])
    create_table_artifact(key=f"{slug}-per-class", description="Per-class report",
                          table=evaluation.per_class_table(result))
    create_markdown_artifact(key=f"{slug}-confusion-matrix", description="Confusion matrix",
                             markdown="# Confusion matrix\n\n" + evaluation.confusion_markdown(result))


def publish_training_artifacts(store: Store, name: str, version: str) -> dict[str, str]:
    """The training-loss curve and the model card of the registered version `name` v`version` as
    markdown artifacts with stable keys `<name>-loss-curve` and `<name>-model-card`.

    The curve is rendered from the version's `train_log.json` and written to the store as
    `models/<name>/<version>/loss_curve.png`; the artifact embeds it as a `data:image/png` URI (both
    Prefect UIs render those in markdown, so the dashboard needs no access to the store) and names
    the PNG's store URI. Returns {artifact key: artifact markdown}.
    """
    version_key = registry.Registry(store, name).version_key(version)
    title, slug = f"{name} v{version}", _slug(name)
    log_key = f"{version_key}/train_log.json"
    log_history = store.read_json(log_key) if store.exists(log_key) else []
    png = plots.loss_curve_png(log_history, title=f"{title}: training loss")
    png_key = f"{version_key}/loss_curve.png"
    store.write_bytes(png_key, png)
    curve = loss_curve_markdown(title, log_history, png, store.uri(png_key))
    card = card_markdown(store.fs.cat_file(store.uri(f"{version_key}/README.md")).decode())
    artifacts = {f"{slug}-loss-curve": curve, f"{slug}-model-card": card}
    create_markdown_artifact(key=f"{slug}-loss-curve", markdown=curve, description=f"Training loss of {title}")
    create_markdown_artifact(key=f"{slug}-model-card", markdown=card, description=f"Model card of {title}")
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


def _slug(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100] or "hfbatch"


class StoreTasks:
    """The tasks above with their results stored in `store`; `url` is the store URL to pass them."""

    def __init__(self, store: Store):
        storage = result_storage(store)
        self.store, self.url = store, store.url
        self.ingest = ingest_task.with_options(result_storage=storage)
        self.holdout = holdout_task.with_options(result_storage=storage)
        self.tokenize = tokenize_task.with_options(result_storage=storage)
        self.train = train_task.with_options(result_storage=storage)
        self.evaluate = evaluate_task.with_options(result_storage=storage)
        self.register = register_task.with_options(result_storage=storage)
