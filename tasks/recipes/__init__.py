"""Training recipes, found by task name. Each module of this package holds one trainable task's `Recipe`
subclass (`base.py` says what one is); adding a trainable task is adding a module here. The modules
import neither torch nor transformers until a recipe trains or evaluates."""
from __future__ import annotations

import functools
import importlib
import pkgutil

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.predictors import aliases as predictor_aliases
from hfbatch.tasks.predictors import predictor_classes
from hfbatch.tasks.recipes.base import Recipe


@functools.cache
def all_recipes() -> dict[str, Recipe]:
    """`{task name: recipe}` of every recipe module of this package, in name order."""
    found: dict[str, Recipe] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        mod = importlib.import_module(f"{__name__}.{module.name}")
        for value in vars(mod).values():
            if (isinstance(value, type) and issubclass(value, Recipe) and value.__module__ == mod.__name__
                    and "task" in vars(value)):  # a shared base class names no task
                found[value.task] = value()
    return dict(sorted(found.items()))


def aliases() -> dict[str, str]:
    return {alias: r.task for r in all_recipes().values() for alias in r.aliases}


def task_names() -> tuple[str, ...]:
    """Every task hfbatch trains (with aliases)."""
    return tuple(sorted([*all_recipes(), *aliases()]))


def get_recipe(task: str) -> Recipe:
    """The recipe of `task` (or an alias such as `ner`); a `ConfigError` saying which tasks train otherwise."""
    recipe = all_recipes().get(aliases().get(task, task))
    if recipe is None:
        if predictor_aliases().get(task, task) in predictor_classes():
            raise ConfigError(f"hfbatch predicts with {task} models but does not train them; it trains "
                              f"{list(all_recipes())}")
        raise ConfigError(f"unsupported task {task!r}; choose one of {list(task_names())}")
    return recipe


__all__ = ["Recipe", "all_recipes", "get_recipe", "task_names"]
