"""Checks the CLI runs before a flow starts (and with it, without `PREFECT_API_URL`, a temporary Prefect
server): the parameters, the data's paths and columns, the input's schema, the output, the model and the
names, answered in seconds. They are the flows' own first steps, run once more without Prefect."""
from __future__ import annotations

import time
from typing import Any

from hfbatch.flows.inference import task_of
from hfbatch.flows.params import EvalParams, InferParams, TrainParams, validated
from hfbatch.tasks.ingest import check_columns
from hfbatch.tasks.inference.output import check_output_location, prepare_output
from hfbatch.tasks.inference.shards import describe_input
from hfbatch.tasks.inference.spec import build_spec, output_for
from hfbatch.tasks.metrics import module_fingerprint
from hfbatch.tasks.models import resolve_model
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.registry import Registry
from hfbatch.tasks.settings import Settings
from hfbatch.tasks.store import Store


def check(command: str, values: dict[str, Any], settings: Settings) -> None:
    """Raise the `HfbatchError` the flow of `command` would raise at its start for `values`."""
    {"train": _train, "evaluate": _evaluate, "infer": _infer}[command](values, settings)


def _train(values: dict, settings: Settings) -> None:
    p = validated(TrainParams, values)
    settings = settings.with_overrides(store=p.store, device=p.device)
    recipe = get_recipe(p.task)
    recipe.check_trainable()
    options = validated(recipe.train_options, values)
    Registry(Store.open(settings), p.name)
    if p.metric_module:
        module_fingerprint(p.metric_module)
    else:
        recipe.check_metrics((p.metric or recipe.default_metric,))
    for src in filter(None, (p.dataset, p.eval_dataset)):
        check_columns(src, recipe, options, settings)
    resolve_model(p.model, settings)


def _evaluate(values: dict, settings: Settings) -> None:
    p = validated(EvalParams, values)
    settings = settings.with_overrides(store=p.store, device=p.device)
    ref = resolve_model(p.model, settings, Store.open(settings))
    recipe = get_recipe(p.task or ref.task or "text-classification")
    recipe.check_trainable()
    recipe.check_metrics(tuple(p.metrics or recipe.metrics))
    if p.metric_module:
        module_fingerprint(p.metric_module)
    check_columns(p.dataset, recipe, validated(recipe.train_options, values), settings)


def _infer(values: dict, settings: Settings) -> None:
    p = validated(InferParams, values)
    settings = settings.with_overrides(device=p.device)
    files = describe_input(p.input, settings.storage_options(p.input), [] if p.on_bad_row == "quarantine" else None)
    ref = resolve_model(p.model, settings, Store.open(settings, p.store))
    recipe = get_recipe(task_of(p.task, ref))
    output = output_for(p.output, ref, time.strftime("%Y-%m-%d", time.gmtime()))
    check_output_location(p.input, output)
    spec = build_spec(recipe.task, ref, output, files, settings, validated(recipe.infer_options, values),
                      p.text_column, p.columns, p.keep_columns, p.batch_tokens, p.on_bad_row, p.precision)
    prepare_output(spec, files, p.mode, claim=False)
