"""The training chain as Prefect flows: ingest → tokenize → train → evaluate → register."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from hfbatch.flows.params import EvalParams, TrainParams, parameters, recipe_options, validated
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.models import label_names, resolve_model, trained_model
from hfbatch.tasks.prefect_tasks import StoreTasks
from hfbatch.tasks.recipes import Options, Recipe, get_recipe
from hfbatch.tasks.core.refs import DatasetRef, ModelRef
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.sources import fingerprint, parse_source
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.training.train import TrainConfig


class _Run:
    """What the steps of one flow run share: the recipe, its options, the settings and the store's tasks."""

    def __init__(self, recipe: Recipe, values: dict, settings: Settings):
        recipe.check_trainable()
        self.recipe, self.settings = recipe, settings
        self.options: Options = validated(recipe.train_options, values)
        self.store = Store.open(settings)
        self.tasks = StoreTasks(self.store)

    def ingest(self, src: str, labels: tuple[str, ...] | None = None) -> DatasetRef:
        """Fingerprint the source here (cheap: bytes, ETag or revision) so the ingest task's cache key
        is its content; an unchanged file is then never read again."""
        fs_options = self.settings.storage_options(src)
        fp = fingerprint(parse_source(src, fs_options), fs_options)
        return self.tasks.ingest(src, self.store, self.recipe.task, self.options, self.settings, fp, labels)

    def tokenize(self, data: DatasetRef, model: ModelRef, max_length: int, split: str) -> DatasetRef:
        return self.tasks.tokenize(data, model, self.store, self.recipe.task, self.options, self.settings,
                                   max_length, split)

    def evaluate(self, model: ModelRef, examples: DatasetRef, max_length: int, metrics: tuple[str, ...],
                 metric_module: str | None = None, artifact_key: str | None = None):
        features = self.tokenize(examples, model, max_length, "eval")
        return self.tasks.evaluate(model, examples, features, self.store, self.recipe.task, self.options,
                                   self.settings, metrics, metric_module, artifact_key)


@flow(name="train")
@parameters(TrainParams, TrainConfig, *recipe_options("train"))
def train_flow(**values) -> dict:
    """Fine-tune `model` on `dataset` for `task`, evaluate it, and register it as a new version of `name`.

    Without `eval_dataset`, a stratified `eval_fraction` of `dataset` is held out for evaluation.
    The new version becomes champion only if its `metric` beats the champion's on the same eval
    set by more than `promotion_margin`.

    With `nproc_per_node` above 1, the train task fine-tunes in that many processes (DDP under
    `torchrun`, which it launches itself); the flow and its other tasks run once, here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the flow itself launched by torchrun: once per process
        raise ConfigError("run the train flow once, not under torchrun: --nproc-per-node N (nproc_per_node) "
                          "launches the training processes itself")
    logger = get_run_logger()
    p, config = validated(TrainParams, values), validated(TrainConfig, values)
    recipe = get_recipe(p.task)
    run = _Run(recipe, values, Settings().with_overrides(store=p.store, device=p.device))
    metric = p.metric or recipe.default_metric
    if not p.metric_module:  # a module's metric names are known once it has run
        recipe.check_metrics((metric,))
    max_length = p.max_length or recipe.max_length
    Registry(run.store, p.name)  # validates the name before any work
    with one_training_per_name(p.name):
        base = resolve_model(p.model, run.settings)
        data = run.ingest(p.dataset)
        if p.eval_dataset:
            eval_data = run.ingest(p.eval_dataset, data.label_names or None)
        else:
            data, eval_data = run.tasks.holdout(data, run.store, recipe.task, p.eval_fraction, config.seed)
        tokens = run.tokenize(data, base, max_length, "train")
        trained = run.tasks.train(tokens, base, run.store, recipe.task, run.options, config, run.settings)
        model = trained_model(trained, run.store, run.settings)
        evaluated = run.evaluate(model, eval_data, max_length, recipe.metrics, p.metric_module, f"{p.name}-eval")
        champion_score = _champion_score(run, p.name, trained.run_key, eval_data, metric, max_length,
                                         p.metric_module)
        registration = run.tasks.register(trained, evaluated, run.store, p.name, metric, p.promotion_margin,
                                          champion_score)
    logger.info("%s v%s: %s=%.4f, champion v%s (%s)", p.name, registration.version, metric,
                evaluated.metrics[metric], registration.champion, registration.reason)
    return {"name": p.name, "task": recipe.task, "version": registration.version, "champion": registration.champion,
            "promoted": registration.promoted, "reason": registration.reason, "metrics": evaluated.metrics,
            "uri": registration.uri, "run_key": trained.run_key, "global_step": trained.global_step,
            "resumed_from_step": trained.resumed_from_step,
            "train_samples_per_second": trained.train_samples_per_second, "train_loss": trained.train_loss,
            "warnings": list(trained.warnings), "device": trained.device,
            "precision": trained.precision, "store": run.store.url}


@contextmanager
def one_training_per_name(name: str) -> Iterator[None]:
    """Hold the slot of a global concurrency limit of 1 named after the model: two trainings of the
    same name never run at once, whichever deployment, worker or machine starts them.

    Only against a Prefect server (`PREFECT_API_URL`): it frees the slot of a killed training when its
    lease expires. A temporary server (Prefect's, or the CLI's: `flows/server.py`) keeps leases in its
    memory, and the next one would find the slot taken for ever; a process with a temporary server of
    its own is alone anyway."""
    from prefect.settings import PREFECT_API_URL

    from hfbatch.flows.server import temporary_api_url

    if not PREFECT_API_URL.value() or PREFECT_API_URL.value() == temporary_api_url():
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


def _champion_score(run: _Run, name: str, run_key: str, eval_data: DatasetRef, metric: str,
                    max_length: int, metric_module: str | None) -> float | None:
    """The champion's `metric` on this eval set: from the registry if it was measured on it, else
    by evaluating the champion now (cached like any evaluation)."""
    champion = Registry(run.store, name).champion()
    if champion is None or champion["run_key"] == run_key:  # none yet, or this very run (a rerun)
        return None
    if champion["eval_dataset"] == eval_data.fingerprint and metric in champion["metrics"]:
        return champion["metrics"][metric]
    champion_model = resolve_model(f"{name}@{champion['version']}", run.settings, run.store)
    return run.evaluate(champion_model, eval_data, max_length, run.recipe.metrics, metric_module).metrics[metric]


@flow(name="evaluate")
@parameters(EvalParams, *recipe_options("train"))
def evaluate_flow(**values) -> dict:
    """Evaluate a registered model (`NAME[@VERSION]`), a local model directory or a hub model."""
    p = validated(EvalParams, values)
    settings = Settings().with_overrides(store=p.store, device=p.device)
    ref = resolve_model(p.model, settings, Store.open(settings))
    recipe = get_recipe(p.task or ref.task or "text-classification")
    run = _Run(recipe, values, settings)
    metrics = tuple(p.metrics or recipe.metrics)
    recipe.check_metrics(metrics)
    data = run.ingest(p.dataset, label_names(ref) or None)
    result = run.evaluate(ref, data, p.max_length or recipe.max_length, metrics, p.metric_module,
                          f"{ref.name or 'model'}-eval")
    return {"model": p.model, "task": recipe.task, "version": ref.version, "dataset": p.dataset,
            "num_rows": result.num_rows, "metrics": result.metrics, **result.details, "uri": result.uri}
