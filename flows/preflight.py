"""Checks the CLI runs before a flow starts (and with it, without `PREFECT_API_URL`, a temporary Prefect
server): the parameters, the data's paths and columns, the input's schema, the output, the model and the
names, answered in seconds. They are the flows' own first steps, run once more without Prefect."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from hfbatch.flows.inference import task_of
from hfbatch.flows.params import EvalParams, InferParams, TrainParams, validated
from hfbatch.tasks.batch.output import check_output_location, prepare_output
from hfbatch.tasks.engine.predictor import get_predictor
from hfbatch.tasks.batch.shards import describe_input
from hfbatch.tasks.batch.spec import InferSpec, build_spec, output_for
from hfbatch.tasks.training.ingest import check_columns
from hfbatch.tasks.metrics import module_fingerprint
from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store


def check(command: str, values: dict[str, Any], settings: Settings):
    """Raise the `HfbatchError` the flow of `command` would raise at its start for `values`; else return
    what the flow loads first (`warm_up` takes it): the model to evaluate, the inference spec."""
    return {"train": _train, "evaluate": _evaluate, "infer": _infer}[command](values, settings)


def warm_up(first_load, in_process: bool = True) -> threading.Thread | None:
    """Begin loading, on a background thread, what the flow loads first, while the flow run starts (and
    a temporary Prefect server comes up): the predictor of an inference whose shards run in this
    process (they take it from `get_predictor`'s cache, waiting for it if need be), else the transformers
    module of the model's architecture and, for an evaluation, the libraries it reads, scores and plots
    with (seconds to import). A failure is left for the flow to meet and report."""
    if isinstance(first_load, InferSpec) and in_process:
        target = _load_predictor
    elif isinstance(first_load, (InferSpec, ModelRef)):
        target = _import_architecture
    else:
        return None
    thread = threading.Thread(target=target, args=(first_load,), name="hfbatch-warm-up", daemon=True)
    thread.start()
    return thread


def _load_predictor(spec: InferSpec) -> None:
    with contextlib.suppress(Exception):
        get_predictor(get_recipe(spec.task).predictor, spec.model, spec.options, spec.settings, spec.precision)


def _import_architecture(first_load) -> None:
    model = first_load.model if isinstance(first_load, InferSpec) else first_load
    with contextlib.suppress(Exception):
        evaluation = isinstance(first_load, ModelRef)
        if evaluation:  # its first step reads the data with datasets
            import datasets  # noqa: F401
        import transformers

        for architecture in json.loads((Path(model.path) / "config.json").read_text()).get("architectures") or ():
            getattr(transformers, architecture, None)
        if evaluation:  # then scores with evaluate and plots
            import evaluate  # noqa: F401
            from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401


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


def _evaluate(values: dict, settings: Settings) -> ModelRef:
    p = validated(EvalParams, values)
    settings = settings.with_overrides(store=p.store, device=p.device)
    ref = resolve_model(p.model, settings, Store.open(settings))
    recipe = get_recipe(p.task or ref.task or "text-classification")
    recipe.check_trainable()
    recipe.check_metrics(tuple(p.metrics or recipe.metrics))
    if p.metric_module:
        module_fingerprint(p.metric_module)
    check_columns(p.dataset, recipe, validated(recipe.train_options, values), settings)
    return ref


def _infer(values: dict, settings: Settings) -> InferSpec:
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
    return spec
