"""Prefect task wrappers: caching and retries around the plain functions of this package.

Every task's cache key is the content key its plain function commits its output under (`*_key`), and
its result is persisted in the store's `prefect-results/`, so a cache hit in one process is a hit in
every process and on every machine that uses the same store.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.tasks import exponential_backoff

from hfbatch.tasks import artifacts, events
from hfbatch.tasks.core.errors import is_transient
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import DatasetRef, EvalResult, ModelRef, TrainedModel
from hfbatch.tasks.core.registry import Registration, Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.training import evaluation, tokenization
from hfbatch.tasks.training import ingest as ingest_mod
from hfbatch.tasks.training import train as train_mod


def result_storage(store: Store):
    """The Prefect result storage inside `store`, saved as a block named after the store (Prefect
    requires result storage to be a saved block so that any worker can read the results back). A
    saved block that is the same is loaded, not saved again (one API call instead of five)."""
    block: LocalFileSystem | RemoteFileSystem
    if store.is_local:
        block = LocalFileSystem(basepath=store.uri("prefect-results"))
    else:
        block = RemoteFileSystem(basepath=store.uri("prefect-results"), settings=store.options)
    name = f"hfbatch-results-{digest(store.url)[:16]}"
    with contextlib.suppress(ValueError):  # ValueError: none of that name yet
        saved = type(block).load(name)
        if all(getattr(saved, f) == getattr(block, f) for f in type(block).model_fields):
            return saved
    block.save(name, overwrite=True)
    return block


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry only failures that may pass (`errors.is_transient`)."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def content_key(key_fn: Callable[..., str]):
    """A `cache_key_fn` that is the content key `key_fn` gives for the task's parameters (those of its
    names), so that a Prefect cache hit and a committed output in the store are the same thing."""
    names = inspect.signature(key_fn).parameters

    def cache_key(context, parameters) -> str:
        key = key_fn(**{k: v for k, v in parameters.items() if k in names})
        return f"{key_fn.__name__}-{key.replace('/', '-')}"

    return cache_key


RETRIES: dict[str, Any] = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                               retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
CACHED: dict[str, Any] = dict(persist_result=True, cache_expiration=None)


@task(name="ingest", cache_key_fn=content_key(ingest_mod.ingest_key), **CACHED, **RETRIES)
def ingest_task(src: str, store: Store, task: str, options: Options, settings: Settings, source_fingerprint: str,
                label_names: tuple[str, ...] | None = None) -> DatasetRef:
    return ingest_mod.ingest(src, store, get_recipe(task), options, settings, label_names, source_fingerprint)


@task(name="holdout", cache_key_fn=content_key(ingest_mod.holdout_key), **CACHED, **RETRIES)
def holdout_task(data: DatasetRef, store: Store, task: str, fraction: float, seed: int
                 ) -> tuple[DatasetRef, DatasetRef]:
    return ingest_mod.holdout(data, store, get_recipe(task), fraction, seed)


@task(name="tokenize", cache_key_fn=content_key(tokenization.tokenize_key), **CACHED, **RETRIES)
def tokenize_task(data: DatasetRef, model: ModelRef, store: Store, task: str, options: Options, settings: Settings,
                  max_length: int, split: str = "train", sample: tuple[int, int] | None = None) -> DatasetRef:
    return tokenization.tokenize(data, model, store, get_recipe(task), options, settings, max_length, split, sample)


@task(name="train", cache_key_fn=content_key(train_mod.run_key), **CACHED, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def train_task(data: DatasetRef, model: ModelRef, store: Store, task: str, options: Options,
               config: train_mod.TrainConfig, settings: Settings, eval_data: DatasetRef | None = None) -> TrainedModel:
    """Fine-tune; a retry (or a rerun after a crash) resumes from the last checkpoint in the store.
    `eval_data`: the tokenized eval set evaluated during training (`config.eval_strategy`)."""
    return train_mod.train(data, model, store, get_recipe(task), options, config, settings, eval_data)


@task(name="evaluate", cache_key_fn=content_key(evaluation.eval_key), **CACHED, **RETRIES)
def evaluate_task(model: ModelRef, examples: DatasetRef, features: DatasetRef, store: Store, task: str,
                  options: Options, settings: Settings, metrics: tuple[str, ...], metric_module: str | None = None,
                  artifact_key: str | None = None) -> EvalResult:
    recipe = get_recipe(task)
    result = evaluation.evaluate_model(model, examples, features, store, recipe, options, settings, metrics,
                                       metric_module)
    if artifact_key:
        artifacts.publish_eval_artifacts(result, artifact_key)
    return result


def registration_key(trained: TrainedModel, evaluated: EvalResult, store: Store, name: str, metric: str,
                     margin: float, champion: EvalResult | None) -> str:
    return digest("register", store.url, name, trained.run_key, evaluated.key, metric, margin,
                  champion and champion.key)


@task(name="register", cache_key_fn=content_key(registration_key), **CACHED, **RETRIES)
def register_task(trained: TrainedModel, evaluated: EvalResult, store: Store, name: str, metric: str,
                  margin: float, champion: EvalResult | None) -> Registration:
    recipe = get_recipe(trained.task)
    registry = Registry(store, name)
    reg = registry.register(trained, evaluated, metric, margin, champion,
                            recipe.card_text(trained.label_names),
                            recipe.gate_problem(evaluated.metrics, evaluated.details))
    index = registry.load()
    if reg.reason != "already registered" and trained.tracker:
        from hfbatch.tasks.training import tracking

        tracking.record_registration(trained.tracker, name, reg.version, evaluated.metrics, reg.uri)
    if reg.reason != "already registered":  # recorded now: tell the automations (a rerun tells nothing new)
        if reg.promoted:
            events.emit_promoted(name, next(h for h in reversed(index["history"]) if h["champion"] == reg.version))
        else:
            events.emit_rejected(reg)
    artifacts.publish_registration(reg)
    artifacts.publish_champion_history(name, index)
    artifacts.publish_training_artifacts(store, name, reg.version)
    artifacts.publish_dashboard(name, index, registry.runs(), store)
    return reg


@task(name="monitor", **RETRIES)
def monitor_task(result: dict, manifest: dict, model: ModelRef, store: Store, threshold: float) -> dict:
    """Record a batch-inference run of a registered model (`result`: its summary) in the registry, with
    the PSI of its predictions against the version's reference; emit `hfbatch.predictions.drifted`
    when a figure drifted; refresh the model's dashboard. Returns the run's record."""
    from prefect.context import FlowRunContext

    from hfbatch.tasks.core.monitoring import run_record

    if not (model.name and model.version):
        raise ValueError(f"monitor_task records the runs of registered models, not of {model.source!r}")
    registry = Registry(store, model.name)
    context = FlowRunContext.get()
    flow_run = {"id": str(context.flow_run.id), "name": context.flow_run.name} if context and context.flow_run else None
    run = run_record(result, manifest, registry.reference(model.version), threshold, flow_run)
    runs = registry.record_run(run)
    if run["drifted"]:
        events.emit_drifted(model.name, run)
    artifacts.publish_dashboard(model.name, registry.load(), runs, store)
    return run


class StoreTasks:
    """The tasks above with their results stored in `store`."""

    def __init__(self, store: Store):
        storage = result_storage(store)
        self.store = store
        self.ingest = ingest_task.with_options(result_storage=storage)
        self.holdout = holdout_task.with_options(result_storage=storage)
        self.tokenize = tokenize_task.with_options(result_storage=storage)
        self.train = train_task.with_options(result_storage=storage)
        self.evaluate = evaluate_task.with_options(result_storage=storage)
        self.register = register_task.with_options(result_storage=storage)
