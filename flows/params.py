"""The flows' parameters, defined once.

Each flow's parameters are typed pydantic models: the common ones below (and, for `train`, the
hyperparameters, `tasks.train.TrainConfig`), plus the options of every task recipe (`Recipe.train_options`, `Recipe.infer_options`: data columns and task settings). The
`parameters` decorator makes them the flow's signature, so that Prefect's parameter schema (the UI's
run form, deployment parameters, their validation), the command line and its `--help`
(`flows/cli.py`) and the README's command table all come from these definitions. Flow parameters
stay flat (`--param dataset=...` and event triggers set one at a time).
"""
from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.recipes import Options, all_recipes, task_names
from hfbatch.tasks.core.settings import Device

Task = Literal[task_names()]
TrainTask = Literal[task_names(trainable=True)]
STORE = Field(None, description="artifact store URL (default: $HFBATCH_STORE or ./hfbatch-store)")
METRIC_MODULE = Field(None, description="a metric of your own: a Python file with compute(predictions, references), "
                      "or a local evaluate module; computed, published and usable in the gate")
DEVICE = Field(None, description="auto: CUDA when torch sees a GPU, else CPU; cpu; cuda: fail without a GPU "
                                 "(default: $HFBATCH_DEVICE or auto)")


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class TrainParams(Params):
    """`train`: fine-tune, evaluate, register and gate a new version of a model name."""

    dataset: str = Field(description="training data: file, directory, s3:// URI or hub id ID[:CONFIG][#SPLIT]")
    model: str = Field(description="base model: local directory or hub id[@revision]")
    name: str = Field(description="registry name the new version is added to")
    task: TrainTask = Field("text-classification", description="the ML task")
    eval_dataset: str | None = Field(None, description="evaluation data (default: hold out eval_fraction of dataset)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of dataset held out without eval_dataset")
    max_length: int | None = Field(None, ge=8, description="truncate inputs to N tokens (default: the task's)")
    metric: str | None = Field(None, description="metric of the champion gate (default: the task's)")
    metric_module: str | None = METRIC_MODULE
    promotion_margin: float = Field(0.0, ge=0, description="a challenger must beat the champion by more than this")
    store: str | None = STORE
    device: Device | None = DEVICE


class EvalParams(Params):
    """`evaluate`: a model's metrics on a labelled dataset."""

    model: str = Field(description="NAME[@VERSION] from the registry, a local directory or a hub id")
    dataset: str = Field(description="labelled data: file, directory, s3:// URI or hub id")
    task: TrainTask | None = Field(None, description="the ML task (default: the registered model's, "
                                                     "else text-classification)")
    metrics: tuple[str, ...] | None = Field(None, description="metrics to compute (default: all of the task's)")
    metric_module: str | None = METRIC_MODULE
    max_length: int | None = Field(None, ge=8, description="truncate inputs to N tokens (default: the task's)")
    store: str | None = STORE
    device: Device | None = DEVICE


class InferParams(Params):
    """`batch_inference`: run a model over Parquet rows, sharded, exactly once."""

    model: str = Field(description="NAME[@VERSION] from the registry, a local directory or a hub id")
    input: str = Field(description="Parquet file, directory, glob or s3:// prefix")
    output: str = Field(description="output directory or s3:// prefix; may hold {date} and {model_version}")
    task: Task | None = Field(None, description="the ML task (default: the registered model's)")
    text_column: str = Field("text", description="column of the input text")
    columns: dict[str, str] | None = Field(None, description="task inputs to columns, e.g. question=q,context=c",
                                           json_schema_extra={"metavar": "INPUT=COLUMN,..."})
    keep_columns: tuple[str, ...] | None = Field(None, description="input columns copied to the output "
                                                                   "(default: id or idx)")
    batch_tokens: int | None = Field(None, ge=1, description="token budget of one model batch "
                                                             "(default: 4096 on CPU, 65536 on CUDA)")
    shard_rows: int = Field(10_000, ge=1, description="target rows per shard")
    mode: Literal["resume", "overwrite", "error"] = Field(
        "resume", description="resume: continue the same input, model and configuration, refuse anything else; "
        "overwrite: replace what the output holds; error: refuse a non-empty output")
    on_bad_row: Literal["fail", "quarantine"] = Field("fail", description="stop at a bad row, or set bad rows "
                                                                          "aside in _quarantine/")
    precision: Literal["auto", "int8", "bf16"] = Field(
        "auto", description="auto: exact (fp32 on CPU, bf16/fp16 on CUDA); int8: quantized linear layers on CPU, "
        "faster, approximate scores; bf16: the model in bf16 on a CPU with bf16 units (AVX512-BF16, AMX), faster, "
        "approximate scores")
    task_runner: Literal["threads", "dask"] = Field("threads", description="run the shards on this process's "
                                                    "threads, or on a Dask cluster (prefect-dask)")
    dask_address: str | None = Field(None, description="with task_runner dask: a scheduler, e.g. tcp://host:8786 "
                                     "(default: a temporary LocalCluster of 2 worker processes)")
    store: str | None = Field(None, description="artifact store URL holding the model registry")
    drift_threshold: float = Field(0.2, gt=0, description="a registered model's run has drifted where the PSI of "
                                   "a prediction figure against the version's evaluation reference is above this")
    device: Device | None = DEVICE


def recipe_options(kind: str) -> list[type[BaseModel]]:
    """The option models of every recipe: `train` (training and evaluation) or `infer`."""
    attr = {"train": "train_options", "infer": "infer_options"}[kind]
    return list(dict.fromkeys(getattr(r, attr) for r in all_recipes().values() if getattr(r, attr) is not None))


def merged_fields(*models: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields of `models`, in order; one declared by two of them must be declared alike."""
    fields: dict[str, FieldInfo] = {}
    for model in models:
        for name, field in model.model_fields.items():
            if name in fields and (fields[name].annotation, fields[name].default) != (field.annotation, field.default):
                raise TypeError(f"parameter {name!r} of {model.__name__} differs from an earlier one")
            fields.setdefault(name, field)
    return fields


def parameters(*models: type[BaseModel]):
    """Make the fields of `models` the keyword-only signature of the decorated `**values` function, with
    their types, constraints and defaults, and their descriptions in its docstring (where Prefect reads
    them)."""
    fields = merged_fields(*models)

    def wrap(fn):
        signature = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                       default=inspect.Parameter.empty if f.is_required() else f.default,
                                       annotation=Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation)
                     for name, f in fields.items()]
        fn.__signature__ = inspect.Signature(signature, return_annotation=dict)
        args = "\n".join(f"    {name}: {f.description}" for name, f in fields.items() if f.description)
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n{args}\n"
        fn.parameter_models = models
        return fn

    return wrap


def validated(model: type[BaseModel], values: dict[str, Any]):
    """`model` of `values`; invalid values are a `ConfigError` naming the parameter and the problem."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid parameter(s): {problems}") from None


def check_parameters(flow, values: dict[str, Any]) -> None:
    """Refuse `values` for `flow` (a deployment's parameters) that it does not take or would reject."""
    fn = getattr(flow, "fn", flow)
    unknown = sorted(set(values) - set(inspect.signature(fn).parameters))
    if unknown:
        raise ConfigError(f"{getattr(flow, 'name', fn.__name__)} has no parameter(s) {unknown}; "
                          f"its parameters: {sorted(inspect.signature(fn).parameters)}")
    for model in getattr(fn, "parameter_models", ()):  # a recipe's own checks run where its task is known
        if not issubclass(model, Options):
            validated(model, values)
    if hasattr(flow, "validate_parameters"):
        from prefect.exceptions import ParameterTypeError

        try:
            flow.validate_parameters(values)
        except ParameterTypeError as e:
            raise ConfigError(f"{flow.name}: {e}") from None
