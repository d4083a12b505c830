"""The training chain as Prefect flows: ingest → tokenize → train → evaluate → register."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from pydantic import Field

from hfbatch.flows.params import PLAN, MaxLength, Planned, TrainOptions, TrainTask, parameter_model, task_options
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.models import label_names, resolve_model, trained_model
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.progress import quiet_libraries
from hfbatch.tasks.core.refs import DatasetRef, EvalResult, ModelRef
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Device, Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.metrics import module_fingerprint, paired
from hfbatch.tasks.prefect_tasks import StoreTasks
from hfbatch.tasks.recipes import Recipe, all_recipes, get_recipe
from hfbatch.tasks.training.ingest import plan_source
from hfbatch.tasks.training.train import TrainConfig, check_peft, training_precision


@dataclass(frozen=True)
class Source:
    """A data source and its content fingerprint, taken once per run."""

    src: str
    fingerprint: str


@dataclass(frozen=True)
class TrainingPlan:
    """What a training or evaluation run works out before its first task."""

    settings: Settings
    recipe: Recipe
    options: Options
    metrics: tuple[str, ...]
    max_length: int
    model: ModelRef
    dataset: Source
    eval_dataset: Source | None = None

    @property
    def store(self) -> Store:
        return Store.open(self.settings)


def _options(p: Any, recipe: Recipe) -> Options:
    return task_options(p.options, recipe.task, {t: r.options_class for t, r in all_recipes().items()})


def _metric_checked(recipe: Recipe, metrics: tuple[str, ...], metric_module: str | None) -> None:
    if metric_module:
        module_fingerprint(metric_module)  # it exists (a module's metric names are known once it has run)
    else:
        recipe.check_metrics(metrics)


def plan_training(p: Any) -> TrainingPlan:
    """The checks before any work, and the training run's first steps (`p`: the flow's parameters): the
    task and its options, the metric, the registry (read and checked), the data sources (their columns
    and content fingerprints), the base model. Raises the `HfbatchError` that says what is wrong."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the flow itself launched by torchrun: once per process
        raise ConfigError("run the train flow once, not under torchrun: --nproc-per-node N (nproc_per_node) "
                          "launches the training processes itself")
    settings = Settings().with_overrides(store=p.store, device=p.device)
    recipe = get_recipe(p.task)
    options = _options(p, recipe)
    metric = p.metric or recipe.default_metric
    _metric_checked(recipe, (metric,), p.metric_module)
    Registry(Store.open(settings), p.name).load()  # a bad name or a torn registry, before any work
    check_peft(p.training)
    training_precision(settings.device, p.training.precision)  # bf16 where the device has no bf16 units
    sources = [Source(src, plan_source(src, options, settings)) for src in filter(None, (p.dataset, p.eval_dataset))]
    return TrainingPlan(settings, recipe, options, (metric,), p.max_length or recipe.max_length,
                        resolve_model(p.model, settings, Store.open(settings), p.gguf_file), sources[0],
                        sources[1] if p.eval_dataset else None)


def plan_evaluation(p: Any) -> TrainingPlan:
    """The checks before any work, and the evaluation run's first steps: the model resolved, its task,
    the metrics, the data source's columns and content fingerprint."""
    settings = Settings().with_overrides(store=p.store, device=p.device)
    ref = resolve_model(p.model, settings, Store.open(settings), p.gguf_file)
    recipe = get_recipe(p.task or ref.task or "text-classification")
    options = _options(p, recipe)
    metrics = tuple(p.metrics or recipe.metrics)
    recipe.check_metrics(metrics)
    _metric_checked(recipe, metrics, p.metric_module)
    return TrainingPlan(settings, recipe, options, metrics, p.max_length or recipe.max_length, ref,
                        Source(p.dataset, plan_source(p.dataset, options, settings)))


class _Run:
    """What the steps of one flow run share: the plan and the store's tasks."""

    def __init__(self, plan: TrainingPlan):
        self.plan, self.recipe, self.options, self.settings = plan, plan.recipe, plan.options, plan.settings
        self.store = plan.store
        quiet_libraries(plan.settings.verbose)
        self.tasks = StoreTasks(self.store)

    def ingest(self, source: Source, labels: tuple[str, ...] | None = None) -> DatasetRef:
        """The ingest task's cache key is the source's content (fingerprinted by the plan): an unchanged
        file is never read again."""
        return self.tasks.ingest(source.src, self.store, self.recipe.task, self.options, self.settings,
                                 source.fingerprint, labels)

    def tokenize(self, data: DatasetRef, model: ModelRef, split: str,
                 sample: tuple[int, int] | None = None) -> DatasetRef:
        return self.tasks.tokenize(data, model, self.store, self.recipe.task, self.options, self.settings,
                                   self.plan.max_length, split, sample)

    def evaluate(self, model: ModelRef, examples: DatasetRef, metrics: tuple[str, ...],
                 metric_module: str | None = None, artifact_key: str | None = None):
        features = self.tokenize(examples, model, "eval")
        return self.tasks.evaluate(model, examples, features, self.store, self.recipe.task, self.options,
                                   self.settings, metrics, metric_module, artifact_key)


@flow(name="train")
def train_flow(
    dataset: str,
    model: str,
    name: str,
    task: TrainTask = "text-classification",
    gguf_file: str | None = None,
    eval_dataset: str | None = None,
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1,
    max_length: MaxLength = None,
    metric: str | None = None,
    metric_module: str | None = None,
    promotion_margin: Annotated[float, Field(ge=0)] = 0.0,
    store: str | None = None,
    device: Device | None = None,
    training: TrainConfig = TrainConfig(),
    options: TrainOptions | None = None,
    plan: Planned = None,
) -> dict:
    """Fine-tune `model` on `dataset` for `task`, evaluate it, and register it as a new version of `name`.

    Without `eval_dataset`, a stratified `eval_fraction` of `dataset` is held out for evaluation. The new
    version becomes champion only if its `metric` beats the champion's on the same eval set by more than
    `promotion_margin` on the evidence: the lower bound of the 95 % paired bootstrap interval of the
    difference (both models' scores of the same eval rows, 1,000 seeded resamples) above the margin. With
    `training.nproc_per_node` above 1, the train task fine-tunes in that many processes (DDP under
    `torchrun`, which it launches itself); the flow and its other tasks run once, here.

    Args:
        dataset: training data: file, directory, s3:// URI or hub id ID[:CONFIG][#SPLIT]
        model: model to start from: local directory, a .gguf file, a registered NAME[@VERSION] (a warm start,
            e.g. retraining from the champion: recorded as the version's parent; with --peft, a LoRA version
            goes on with its adapter on its own base) or hub id[@revision]
        name: registry name the new version is added to
        task: the ML task
        gguf_file: with a hub id: the repository's GGUF file to convert and start from
        eval_dataset: evaluation data (default: hold out eval_fraction of dataset)
        eval_fraction: fraction of dataset held out without eval_dataset
        max_length: truncate inputs to N tokens (default: the task's)
        metric: metric of the champion gate (default: the task's)
        metric_module: a metric of your own: a Python file with compute(predictions, references), or a local
            evaluate module; computed, published and usable in the gate
        promotion_margin: a challenger must beat the champion by more than this (the lower bound of the 95 %
            interval of the difference, paired bootstrap over the eval rows)
        store: artifact store URL (default: $HFBATCH_STORE or ./hfbatch-store)
        device: auto: CUDA when torch sees a GPU, else CPU; cpu; cuda: fail without a GPU (default:
            $HFBATCH_DEVICE or auto)
        training: training hyperparameters
        options: the task's data columns and settings, under its name (e.g. question_answering)
        plan: the run's plan (`plan_training`), when the caller has worked it out
    """
    if plan is None:
        plan = plan_training(TrainParams.model_construct(**{k: v for k, v in locals().items() if k != PLAN}))
    logger = get_run_logger()
    run, recipe, metric = _Run(plan), plan.recipe, plan.metrics[0]
    with one_training_per_name(name):
        data = run.ingest(plan.dataset)
        if plan.eval_dataset:
            eval_data = run.ingest(plan.eval_dataset, data.label_names or None)
        else:
            data, eval_data = run.tasks.holdout(data, run.store, recipe.task, eval_fraction, training.seed)
        # only the rows training will use (--max-train-samples), drawn as training drew them from all rows
        sample = (training.max_train_samples, training.seed) if training.max_train_samples else None
        tokens = run.tokenize(data, plan.model, "train", sample)
        # evaluated during training (the eval rows' loss, or preference training's rewards): tokenized as
        # training rows are
        in_training = training.eval_strategy != "no" or recipe.evaluates_while_training(run.options)
        eval_tokens = run.tokenize(eval_data, plan.model, "train") if in_training else None
        trained = run.tasks.train(tokens, plan.model, run.store, recipe.task, run.options, training, run.settings,
                                  eval_tokens)
        model_ref = trained_model(trained, run.store, run.settings)
        evaluated = run.evaluate(model_ref, eval_data, recipe.metrics, metric_module, f"{name}-eval")
        if trained.eval_metrics:  # what training measured of the model, registered with the evaluation's
            evaluated = dataclasses.replace(evaluated, metrics={**evaluated.metrics, **trained.eval_metrics})
        champion = _champion_eval(run, name, trained.run_key, eval_data, metric_module)
        registration = run.tasks.register(trained, evaluated, run.store, name, metric, promotion_margin, champion)
    logger.info("%s v%s: %s=%.4f, champion v%s (%s)", name, registration.version, metric,
                evaluated.metrics[metric], registration.champion, registration.reason)
    return {"name": name, "task": recipe.task, "version": registration.version, "champion": registration.champion,
            "promoted": registration.promoted, "reason": registration.reason, "metrics": evaluated.metrics,
            "intervals": evaluated.intervals,
            "uri": registration.uri, "run_key": trained.run_key, "global_step": trained.global_step,
            "resumed_from_step": trained.resumed_from_step,
            "train_samples_per_second": trained.train_samples_per_second, "train_loss": trained.train_loss,
            "warnings": list(trained.warnings), "device": trained.device,
            "precision": trained.precision, "store": run.store.url}


TrainParams = parameter_model(train_flow)
"""The parameters of `train_flow` as one model (what `plan_training` takes)."""


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


def _champion_eval(run: _Run, name: str, run_key: str, eval_data: DatasetRef,
                   metric_module: str | None) -> EvalResult | None:
    """The champion's evaluation on this eval set, with its row statistics (the gate's evidence): the
    evaluation recorded with it where it was on this set, else evaluated now (cached like any evaluation)."""
    champion = Registry(run.store, name).champion()
    if champion is None or champion["run_key"] == run_key:  # none yet, or this very run (a rerun)
        return None
    key = champion.get("eval_key")
    if key and champion["eval_dataset"] == eval_data.fingerprint and paired.stored_rows(run.store, key):
        recorded = run.store.committed(key, EvalResult)
        if recorded is not None:
            return recorded
    champion_model = resolve_model(f"{name}@{champion['version']}", run.settings, run.store)
    return run.evaluate(champion_model, eval_data, run.recipe.metrics, metric_module)


@flow(name="evaluate")
def evaluate_flow(
    model: str,
    dataset: str,
    task: TrainTask | None = None,
    gguf_file: str | None = None,
    metrics: tuple[str, ...] | None = None,
    metric_module: str | None = None,
    max_length: MaxLength = None,
    store: str | None = None,
    device: Device | None = None,
    options: TrainOptions | None = None,
    plan: Planned = None,
) -> dict:
    """Evaluate a registered model (`NAME[@VERSION]`), a local model directory or a hub model.

    Args:
        model: NAME[@VERSION] from the registry, a local directory or a hub id
        dataset: labelled data: file, directory, s3:// URI or hub id
        task: the ML task (default: the registered model's, else text-classification)
        gguf_file: with a hub id: the repository's GGUF file to convert and evaluate
        metrics: metrics to compute (default: all of the task's)
        metric_module: a metric of your own: a Python file with compute(predictions, references), or a local
            evaluate module; computed, published and usable in the gate
        max_length: truncate inputs to N tokens (default: the task's)
        store: artifact store URL (default: $HFBATCH_STORE or ./hfbatch-store)
        device: auto: CUDA when torch sees a GPU, else CPU; cpu; cuda: fail without a GPU (default:
            $HFBATCH_DEVICE or auto)
        options: the task's data columns and settings, under its name (e.g. question_answering)
        plan: the run's plan (`plan_evaluation`), when the caller has worked it out
    """
    if plan is None:
        plan = plan_evaluation(EvalParams.model_construct(**{k: v for k, v in locals().items() if k != PLAN}))
    run, ref = _Run(plan), plan.model
    data = run.ingest(plan.dataset, label_names(ref) or None)
    result = run.evaluate(ref, data, plan.metrics, metric_module, f"{ref.name or 'model'}-eval")
    return {"model": model, "task": plan.recipe.task, "version": ref.version, "dataset": dataset,
            "num_rows": result.num_rows, "metrics": result.metrics, "intervals": result.intervals, **result.details,
            "uri": result.uri}


EvalParams = parameter_model(evaluate_flow)
"""The parameters of `evaluate_flow` as one model (what `plan_evaluation` takes)."""
