"""Task recipes, found by task name. Each module of this package holds one task's `Recipe` subclass;
adding a task is adding a module here."""
from __future__ import annotations

import functools
import importlib
import pkgutil

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.recipes.base import Options, Recipe


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


def task_names(trainable: bool = False) -> tuple[str, ...]:
    """Every task name (with aliases), or those hfbatch can train."""
    if trainable:
        return tuple(t for t, r in all_recipes().items() if r.trainable)
    return tuple(sorted([*all_recipes(), *aliases()]))


def get_recipe(task: str) -> Recipe:
    """The recipe of `task` (or an alias such as `ner`); a `ConfigError` listing the tasks otherwise."""
    recipe = all_recipes().get(aliases().get(task, task))
    if recipe is None:
        raise ConfigError(f"unsupported task {task!r}; choose one of {list(task_names())}")
    return recipe


__all__ = ["Options", "Recipe", "all_recipes", "get_recipe", "task_names"]
