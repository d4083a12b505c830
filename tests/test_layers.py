"""The package's layers import one way: flows → steps (training steps, the batch job) → recipes →
predictors → engine → core. The batch job is handed a predictor and imports no recipe or predictor;
artifacts and plots take the details they render."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first: a module imports only its own layer or lower ones
    ("core", ("hfbatch.tasks.core", "hfbatch.tasks.metrics")),
    ("engine", ("hfbatch.tasks.engine",)),
    ("predictors", ("hfbatch.tasks.predictors",)),
    ("recipes", ("hfbatch.tasks.recipes",)),
    ("steps", ("hfbatch.tasks.training", "hfbatch.tasks.batch", "hfbatch.tasks.artifacts", "hfbatch.tasks.events",
               "hfbatch.tasks.watch", "hfbatch.tasks.prefect_tasks")),
    ("flows", ("hfbatch.flows",)),
]


def _module(path: Path) -> str:
    top, *rest = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(["hfbatch", top, *rest]).removesuffix(".__init__")


def _layer(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hfbatch"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hfbatch")}
    return found


def test_every_module_belongs_to_a_layer_and_imports_downward_only():
    upward = []
    files = sorted([*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/**/*.py")])
    assert files
    for path in files:
        if "metrics" in path.parts and path.parent.name != "metrics":
            continue  # the evaluate metric scripts: loaded by path, not imported
        module = _module(path)
        layer = _layer(module)
        assert layer is not None or module == "hfbatch.tasks", f"{module} is in no layer"
        for imported in _imports(path):
            target = _layer(imported)
            if layer is not None and target is not None and target > layer:
                upward.append(f"{module} ({LAYERS[layer][0]}) imports {imported} ({LAYERS[target][0]})")
    assert not upward, "\n".join(upward)


def test_the_batch_job_and_the_artifacts_know_no_task():
    """The batch job is handed a predictor; artifacts render what an evaluation recorded."""
    for path in [*ROOT.glob("tasks/batch/*.py"), ROOT / "tasks" / "artifacts.py", ROOT / "tasks" / "core" / "plots.py"]:
        for imported in _imports(path):
            assert not imported.startswith(("hfbatch.tasks.recipes", "hfbatch.tasks.predictors")), (path, imported)


def test_imports_are_absolute():
    for path in [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"relative import in {path}"
