"""Inference predictors, found by task name. Each module of this package holds one task's `Predictor`
subclass (`engine/predictor.py` says what one is); adding a task to bulk inference is adding a module
here. The modules import neither torch nor transformers until a predictor is loaded."""
from __future__ import annotations

import functools
import importlib
import pkgutil

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.engine.predictor import Predictor


@functools.cache
def predictor_classes() -> dict[str, type[Predictor]]:
    """`{task name: predictor class}` of every module of this package, in name order."""
    found: dict[str, type[Predictor]] = {}
    for module in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{module.name}")
        for value in vars(mod).values():
            if (isinstance(value, type) and issubclass(value, Predictor) and value.__module__ == mod.__name__
                    and "task" in vars(value)):  # a shared base class names no task
                found[value.task] = value
    return dict(sorted(found.items()))


def aliases() -> dict[str, str]:
    return {alias: cls.task for cls in predictor_classes().values() for alias in cls.aliases}


def task_names() -> tuple[str, ...]:
    """Every task bulk inference runs, with aliases."""
    return tuple(sorted([*predictor_classes(), *aliases()]))


def canonical_task(task: str) -> str:
    """`task`'s own name (`ner` -> `token-classification`); a `ConfigError` listing the tasks otherwise."""
    name = aliases().get(task, task)
    if name not in predictor_classes():
        raise ConfigError(f"unsupported task {task!r}; choose one of {list(task_names())}")
    return name


def get_predictor_class(task: str) -> type[Predictor]:
    """The predictor of `task` (or an alias such as `ner`)."""
    return predictor_classes()[canonical_task(task)]
