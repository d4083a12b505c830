"""The training chain as Prefect flows: ingest → tokenize → train → evaluate → register."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from tasks.metrics import AVAILABLE
from tasks.models import ModelRef, resolve_model
from tasks.prefect_tasks import StoreTasks
from tasks.registry import Registry
from tasks.sources import fingerprint, parse_source
from tasks.store import Store
from tasks.train import TrainConfig


def _ingest(t: StoreTasks, src: str, text_column: str, label_column: str, label_names=None):
    """Fingerprint the source here (cheap: bytes, ETag or revision) so the ingest task's cache key
    is its content; an unchanged file is then never read again."""
    return t.ingest(src, t.url, fingerprint(parse_source(src)), text_column, label_column, label_names)


@flow(name="train")
def train_flow(dataset: str, model: str, name: str, eval_dataset: str | None = None,
               text_column: str = "text", label_column: str = "label", max_train_samples: int | None = None,
               epochs: float = 1.0, batch_size: int = 32, learning_rate: float = 5e-5, max_length: int = 128,
               seed: int = 42, save_steps: int = 200, eval_fraction: float = 0.1, metric: str = "accuracy",
               promotion_margin: float = 0.0, store: str | None = None) -> dict:
    """Fine-tune `model` on `dataset`, evaluate it, and register it as a new version of `name`.

    Without `eval_dataset`, a stratified `eval_fraction` of `dataset` is held out for evaluation.
    The new version becomes champion only if its `metric` beats the champion's on the same eval
    set by more than `promotion_margin`.
    """
    logger = get_run_logger()
    st = Store(store)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                         max_train_samples=max_train_samples, seed=seed, save_steps=save_steps).validate()
    Registry(st, name)  # validates the name before any work
    with one_training_per_name(name):
        base = resolve_model(model)
        t = StoreTasks(st)
        data = _ingest(t, dataset, text_column, label_column)
        if eval_dataset:
            eval_data = _ingest(t, eval_dataset, text_column, label_column, data.label_names)
        else:
            data, eval_data = t.holdout(data, t.url, eval_fraction, seed)
        tokens = t.tokenize(data, base, t.url, max_length)
        eval_tokens = t.tokenize(eval_data, base, t.url, max_length)
        trained = t.train(tokens, base, t.url, config)
        evaluated = t.evaluate(trained.model_ref(), eval_tokens, t.url, tuple(AVAILABLE), f"{name}-eval")
        champion_score = _champion_score(t, name, trained.run_key, eval_data, evaluated.dataset_fingerprint, metric,
                                        max_length)
        registration = t.register(trained, evaluated, t.url, name, metric, promotion_margin, champion_score)
    logger.info("%s v%s: %s=%.4f, champion v%s (%s)", name, registration.version, metric,
                evaluated.metrics[metric], registration.champion, registration.reason)
    return {"name": name, "version": registration.version, "champion": registration.champion,
            "promoted": registration.promoted, "reason": registration.reason, "metrics": evaluated.metrics,
            "uri": registration.uri, "run_key": trained.run_key, "global_step": trained.global_step,
            "resumed_from_step": trained.resumed_from_step,
            "train_samples_per_second": trained.train_samples_per_second, "device": trained.device,
            "precision": trained.precision, "store": st.url}


@contextmanager
def one_training_per_name(name: str) -> Iterator[None]:
    """Hold the slot of a global concurrency limit of 1 named after the model: two trainings of the
    same name never run at once, whichever deployment, worker or machine starts them.

    Only against a Prefect server (`PREFECT_API_URL`): it frees the slot of a killed training when its
    lease expires. A temporary server keeps leases in its memory, and the next one would find the slot
    taken for ever; a process with a temporary server of its own is alone anyway."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    limit = f"hfbatch-train-{name}"  # a valid model name is a valid limit name
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(limit, 1)
        except ObjectAlreadyExists:  # another training created it at the same moment
            pass
    with concurrency(limit, occupy=1, strict=True):
        yield


def _champion_score(t: StoreTasks, name: str, run_key: str, eval_data, eval_fingerprint: str, metric: str,
                    max_length: int) -> float | None:
    """The champion's `metric` on this eval set: from the registry if it was measured on it, else
    by evaluating the champion now (cached like any evaluation)."""
    champion = Registry(t.store, name).champion()
    if champion is None or champion["run_key"] == run_key:  # none yet, or this very run (a rerun)
        return None
    if champion["eval_dataset"] == eval_fingerprint and metric in champion["metrics"]:
        return champion["metrics"][metric]
    champion_model = resolve_model(f"{name}@{champion['version']}", t.store)
    tokens = t.tokenize(eval_data, champion_model, t.url, max_length)
    return t.evaluate(champion_model, tokens, t.url, tuple(AVAILABLE)).metrics[metric]


@flow(name="evaluate")
def evaluate_flow(model: str, dataset: str, metrics: tuple[str, ...] = tuple(AVAILABLE),
                  text_column: str = "text", label_column: str = "label", max_length: int = 128,
                  store: str | None = None) -> dict:
    """Evaluate a registered model (`NAME[@VERSION]`), a local model directory or a hub model."""
    st = Store(store)
    ref = resolve_model(model, st)
    t = StoreTasks(st)
    data = _ingest(t, dataset, text_column, label_column, _label_names(ref))
    tokens = t.tokenize(data, ref, t.url, max_length)
    result = t.evaluate(ref, tokens, t.url, tuple(metrics), f"{ref.name or 'model'}-eval")
    return {"model": model, "version": ref.version, "dataset": dataset, "num_rows": result.num_rows,
            "metrics": result.metrics, "per_class": result.per_class, "uri": result.uri}


def _label_names(model: ModelRef) -> tuple[str, ...]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.path)
    return tuple(config.id2label[i] for i in range(len(config.id2label)))
