"""The package as installed: `hfbatch.tasks` and `hfbatch.flows` only (no top-level `tasks` or `flows`),
and an import graph without cycles, imports inside functions included."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"hfbatch.tasks": ROOT / "tasks", "hfbatch.flows": ROOT / "flows"}


def test_installed_as_hfbatch_without_top_level_tasks_or_flows(tmp_path):
    """From a directory outside the checkout: what the installed distribution provides."""
    probe = ("import importlib.util, hfbatch.flows.cli, hfbatch.tasks.recipes as r; "
             "print(sorted(r.all_recipes()), importlib.util.find_spec('tasks'), importlib.util.find_spec('flows'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split("] ")[1].split() == ["None", "None"], out.stdout
    assert "text-classification" in out.stdout
    cli = subprocess.run([Path(sys.executable).parent / "hfbatch", "--help"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert cli.returncode == 0 and "train" in cli.stdout and "infer" in cli.stdout


def _module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
    raise AssertionError(path)


def _imports(path: Path, module: str) -> set[str]:
    """hfbatch modules `path` imports anywhere (top level or inside functions), relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("hfbatch.")}


def test_no_import_cycles():
    modules = {_module_name(p): p for folder in PACKAGES.values() for p in folder.rglob("*.py")}
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 30 and not cycles, cycles
