"""Local `evaluate` metric modules, loaded by path so evaluation never needs the Hugging Face Hub."""
from pathlib import Path

METRICS_DIR = Path(__file__).parent
AVAILABLE = ("accuracy", "precision", "recall", "f1")


def metric_path(name: str) -> str:
    """The directory of the local evaluate module `name` (pass it to `evaluate.load`)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").exists():
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(AVAILABLE + ('confusion_matrix',))}")
    return str(path)
