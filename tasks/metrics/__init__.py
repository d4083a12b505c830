"""Local `evaluate` metric modules, loaded by path so evaluation never needs the Hugging Face Hub."""
from __future__ import annotations

from pathlib import Path

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
