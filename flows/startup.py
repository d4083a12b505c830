"""A command's first steps: the temporary Prefect server of a flow command without a Prefect API, then
the imports, without the parts of two packages that no command uses.

A small command's time is mostly imports (its CPU time is its wall time: the imports hold the GIL), and
two packages import, in their `__init__`, optional parts hfbatch never calls:

- httpx (under Prefect and huggingface_hub) imports its own command line when it can, and with it click:
  0.2 s of every command;
- evaluate imports its `Evaluator` classes (model evaluation through a `pipeline`, not the metric
  modules hfbatch loads) and with them scipy.stats, for their bootstrap confidence intervals: 0.55 s
  of every `train` and `evaluate`.

Both packages treat a missing optional dependency as unavailable (httpx's `main` then says to install
`httpx[cli]`; evaluate's `Evaluator` refuses the bootstrap strategy). Each part is marked missing only
while its package imports, in the main thread before any other thread starts, so a later import of it
(a user's metric module importing scipy.stats, say) loads it as usual.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


def begin(command: str, runs_flow: bool) -> None:
    """Start the temporary server first when `runs_flow` (`flows/server.py`: it starts while this process
    imports the flows and checks the input), then `import_lean`."""
    if runs_flow:
        from hfbatch.flows.server import start_unless_configured

        start_unless_configured()
    import_lean(command)


def import_lean(command: str) -> None:
    """Import httpx, and for `train` and `evaluate` the evaluate library, without the parts above."""
    with _unavailable("httpx._main"):
        import httpx  # noqa: F401
    if command in ("train", "evaluate"):
        with _unavailable("scipy.stats"):
            import evaluate  # noqa: F401


@contextmanager
def _unavailable(module: str) -> Iterator[None]:
    """While in the block, `import module` raises ImportError (unless it was imported already)."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  # the import system's own "not available" mark
    try:
        yield
    finally:
        if sys.modules.get(module, ...) is None:
            del sys.modules[module]
