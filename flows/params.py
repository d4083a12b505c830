"""The flows' parameters: the types their signatures are written with, and what the command line, the
Prefect UI and the deployments read from those signatures.

Each flow is an ordinary typed function (`flows/training.py`, `flows/inference.py`). Its common
parameters are flat (`dataset`, `model`, `name`, ...: what a deployment or an event trigger sets one at a
time); the training hyperparameters are one model (`training`); the task options are one model with a
field per task (`options.question_answering.doc_stride`), so that one name can mean different things in
two tasks and a task brings its options with its own module. Prefect's parameter schema (the UI's run
form, deployment parameters and their validation), the command line and its `--help` (`flows/cli.py`)
and the README's command table all come from these signatures. This module imports neither torch nor
transformers.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.options import Options, param_name, validated
from hfbatch.tasks.predictors import predictor_classes
from hfbatch.tasks.predictors import task_names as infer_task_names
from hfbatch.tasks.recipes import all_recipes
from hfbatch.tasks.recipes import task_names as train_task_names

if TYPE_CHECKING:  # made at import from the recipes and predictors found: plain names to a type checker
    TrainTask: TypeAlias = str
    InferTask: TypeAlias = str
else:
    TrainTask = Literal[train_task_names()]
    InferTask = Literal[infer_task_names()]
MaxLength = Annotated[int, Field(ge=8)] | None
PLAN = "plan"
Planned = Annotated[Any, SkipJsonSchema()]
"""The type of a flow's last parameter, `plan`: what the flow works out before its first task (inputs
listed and fingerprinted, model resolved, output checked), handed over by a caller that has worked it out
already (the command line does, before the flow run starts, to answer a bad input in seconds); None: the
flow works it out. Not an option: not on the command line, in the UI's form or a deployment's parameters;
the flow run's recorded parameters show its type only."""


def task_options_model(name: str, classes: dict[str, type[Options]]) -> type[Options]:
    """A model with one field per task that has options: that task's options, None until given."""
    fields: dict[str, Any] = {param_name(task): (cls | None, Field(None, description=f"options of {task}"))
                              for task, cls in classes.items() if cls.model_fields}
    return create_model(name, __base__=Options, __doc__="Each task's options (a field per task).", **fields)


if TYPE_CHECKING:
    TrainOptions: TypeAlias = Options
    InferOptions: TypeAlias = Options
else:
    TrainOptions = task_options_model("TrainOptions", {t: r.options_class for t, r in all_recipes().items()})
    InferOptions = task_options_model("InferOptions", {t: c.options_class for t, c in predictor_classes().items()})


def task_options(options: Options | None, task: str, classes: dict[str, type[Options]]) -> Options:
    """The options of `task` (its own name) in a flow's `options`: as given, else the task's defaults; a
    `ConfigError` naming what the task needs and was not given."""
    given = getattr(options, param_name(task), None) if options is not None else None
    if given is not None:
        return given
    return validated(classes[task], {}, f" of {task}")


@functools.cache
def parameter_model(fn) -> type[BaseModel]:
    """The pydantic model of a flow's signature: one field per parameter, with its type, constraints and
    default, and its description from the docstring's `Args:` (as Prefect reads it): what the CLI
    validates a command line with and takes its help from. Its `plan` is not a parameter of this model."""
    from prefect.utilities.callables import parameter_docstrings

    fn = getattr(fn, "fn", fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    docs = parameter_docstrings(inspect.getdoc(fn))
    fields = {name: (hints[name], Field(... if p.default is inspect.Parameter.empty else p.default,
                                        description=" ".join(docs.get(name, "").split()) or None))
              for name, p in inspect.signature(fn).parameters.items() if name != PLAN}
    return create_model(f"{fn.__name__}_parameters", __config__=ConfigDict(frozen=True, extra="forbid"),
                        **fields)  # type: ignore[call-overload]


@dataclass
class Option:
    """A command-line option of a flow parameter, or of a field of its `training` or `options` model
    (one option for the same field name in several tasks)."""

    flag: str
    dest: str
    annotation: Any
    info: FieldInfo
    paths: dict[str | None, tuple[str, ...]] = field(default_factory=dict)
    """Where a value goes: `{None: path}` for a flat parameter or a `training` field, else
    `{task: ("options", task_param, field name)}` for each task that has the field."""
    helps: dict[str, list[str]] = field(default_factory=dict)
    """Per-task options: {description: [tasks]}."""

    @property
    def per_task(self) -> bool:
        return None not in self.paths

    @property
    def required(self) -> bool:
        return not self.per_task and self.info.is_required()

    @property
    def aliases(self) -> tuple[str, ...]:
        extra = self.info.json_schema_extra if isinstance(self.info.json_schema_extra, dict) else {}
        return tuple(str(a) for a in extra.get("cli_aliases") or ())  # type: ignore[union-attr]

    @property
    def help(self) -> str:
        if not self.per_task:
            return self.info.description or ""
        return "; ".join(f"{', '.join(tasks)}: {text}" for text, tasks in self.helps.items())


def flow_options(fn) -> list[Option]:
    """The command-line options of a flow: its flat parameters, the fields of `training`, and the fields
    of every task's options (merged by name), in signature order."""
    fn = getattr(fn, "fn", fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    model = parameter_model(fn)
    options: dict[str, Option] = {}

    def add(name: str, annotation: Any, info: FieldInfo, path: tuple[str, ...], task: str | None) -> None:
        option = options.setdefault(name, Option(f"--{name.replace('_', '-')}", name, annotation, info))
        option.paths[task] = path
        if task is not None:
            default = info.get_default()
            shown = "" if default in (None, False, (), [], "") or info.is_required() else f" (default: {default})"
            option.helps.setdefault((info.description or "") + shown, []).append(task)

    for name, info in model.model_fields.items():
        kind = _model_of(hints[name])
        if kind is None:
            add(name, hints[name], info, (name,), None)
        elif name == "options":
            for task_param, task_field in kind.model_fields.items():
                task = task_param.replace("_", "-")
                for fname, finfo in _options_model(task_field.annotation).model_fields.items():
                    add(fname, finfo.annotation, finfo, ("options", task_param, fname), task)
        else:
            for fname, finfo in kind.model_fields.items():
                add(fname, finfo.annotation, finfo, (name, fname), None)
    return list(options.values())


def _options_model(annotation) -> type[BaseModel]:
    found = _model_of(annotation)
    assert found is not None, annotation
    return found


def _model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model a (possibly optional or annotated) parameter type is, else None."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    found = args[0] if len(args) == 1 else None
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def flow_values(fn, given: dict[str, Any], task: str) -> dict[str, Any]:
    """The keyword arguments of a flow call from command-line values (`{option dest: value}`, only those
    given), for `task` (its own name): flat values as they are, the `training` fields in one dict, the
    task's options in `options`. An option of another task is a `ConfigError` naming it."""
    values: dict[str, Any] = {}
    options = flow_options(fn)
    unknown = sorted(set(given) - {o.dest for o in options})
    if unknown:
        raise ConfigError(f"no such option: {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    for option in options:
        if option.dest not in given:
            continue
        path = option.paths.get(None) or option.paths.get(task)
        if path is None:
            tasks = sorted(t for t in option.paths if t is not None)
            raise ConfigError(f"{option.flag} is an option of {', '.join(tasks)}, not of {task}")
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = given[option.dest]
    return values


def check_parameters(flow, values: dict[str, Any]) -> None:
    """Refuse `values` for `flow` (a deployment's parameters) that it does not take or would reject, in
    the message format of the command line."""
    validated(parameter_model(flow), values, f" of {getattr(flow, 'name', getattr(flow, '__name__', 'the flow'))}")
