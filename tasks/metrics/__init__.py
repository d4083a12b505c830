"""Local `evaluate` metric modules, loaded by path so evaluation never needs the Hugging Face Hub."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.fingerprint import hash_files

METRICS_DIR = Path(__file__).parent


def available() -> tuple[str, ...]:
    """The names of the metric modules shipped here."""
    return tuple(sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").exists()))


def metric_path(name: str) -> str:
    """The directory of the local evaluate module `name` (pass it to `evaluate.load`)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").exists():
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available())}")
    return str(path)


def compute(names: tuple[str, ...], predictions, references, **kwargs) -> dict:
    """The metrics `names` of `predictions` against `references` through `evaluate` (one combined call);
    `kwargs` go to every metric (e.g. `average`, `labels`)."""
    import evaluate

    modules = [evaluate.load(metric_path(n)) for n in names]
    combined = modules[0] if len(modules) == 1 else evaluate.combine(modules)
    return combined.compute(predictions=predictions, references=references, **kwargs)


def module_fingerprint(path: str) -> str:
    """Content fingerprint of a custom metric module (a file, or a folder's Python files)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"metric module {path!r} does not exist")
    return hash_files(sorted(p.rglob("*.py")) if p.is_dir() else [p])


def compute_custom(path: str, predictions: list, references: list) -> dict[str, float]:
    """The figures of a user's metric module: a Python file with a `compute(predictions, references)`
    function, or a local `evaluate` module (a script defining an `evaluate.Metric`, or its folder).
    It gets the task's post-processed predictions and references (`Recipe.postprocess`)."""
    import evaluate

    p = Path(path).expanduser()
    module_fingerprint(path)
    compute_fn = None
    if p.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"hfbatch_metric_{p.stem}", p)
        if spec is None or spec.loader is None:
            raise ConfigError(f"metric module {path!r} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        compute_fn = getattr(module, "compute", None)
    result = (compute_fn(predictions=predictions, references=references) if callable(compute_fn)
              else evaluate.load(str(p)).compute(predictions=predictions, references=references))
    if not isinstance(result, dict) or not all(isinstance(v, (int, float)) for v in result.values()):
        raise ConfigError(f"metric module {path!r} must return a mapping of names to numbers, got {result!r}")
    return {k: float(v) for k, v in result.items()}


def metric_script(name: str):
    """The local metric module `name` as a Python module (its helpers, e.g. `squad.normalize`)."""
    path = Path(metric_path(name)) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hfbatch_metric_script_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
