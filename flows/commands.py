"""Running a flow command (`train`, `evaluate`, `infer`) from the command line: its options become the
flow's keyword arguments (`params.flow_values`), validated with the flow's parameter model (one message
for every bad option), its plan worked out once before the flow run starts and handed to the flow as its
`plan` argument, what the flow loads first loaded meanwhile, then the flow called."""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

from hfbatch.flows import server
from hfbatch.flows.params import flow_values, parameter_model
from hfbatch.tasks.core.errors import ConfigError, HfbatchError
from hfbatch.tasks.core.options import validated

COMMANDS = {"train": "fine-tune, evaluate, register and gate a model",
            "evaluate": "evaluate a model on a labelled dataset",
            "infer": "run a model over Parquet rows (sharded, exactly once)"}


def flows() -> dict[str, Any]:
    """The flow behind each flow command."""
    from hfbatch.flows.inference import batch_inference
    from hfbatch.flows.training import evaluate_flow, train_flow

    return {"train": train_flow, "evaluate": evaluate_flow, "infer": batch_inference}


def planner(command: str):
    from hfbatch.flows import inference, training

    return {"train": training.plan_training, "evaluate": training.plan_evaluation,
            "infer": inference.plan_inference}[command]


def run(command: str, given: dict[str, Any], progress=None) -> dict:
    """Run the flow of `command` with the options `given` (only those on the command line); `progress`
    (a callback) hears of every finished shard of an inference."""
    flow = flows()[command]
    values = flow_values(flow, given, command_task(command, given))
    params = validated(parameter_model(flow), values)
    from hfbatch.tasks.core.settings import Settings

    server.check_api(Settings().api_timeout)  # a configured API that is down: said before any work
    plan = planner(command)(params)  # before a flow run (and a server) starts: a bad input is said at once
    loading = warm_up(command, plan)
    server.ready()
    if command == "evaluate" and loading is not None:
        # its imports done before the flow reads data: datasets' hashing looks into a transformers module
        # that another thread is still importing, and fails ("no attribute 'PreTrainedTokenizerBase'")
        loading.join()
    if progress is None:
        return flow(**values, plan=plan)
    from hfbatch.flows.inference import progress_listener

    with progress_listener(progress):
        return flow(**values, plan=plan)


def command_task(command: str, given: dict[str, Any]) -> str:
    """The task whose options the command line's task options are: `--task`, else a registered model's
    task, else text classification for training and evaluation."""
    from hfbatch.tasks.predictors import canonical_task

    task = given.get("task")
    if task is None and command != "train":
        task = _registered_task(given.get("model"), given.get("store"))
    if task is None and command == "infer":
        return "text-classification"  # only its options can be given (it has none): any other is refused
    return canonical_task(task or "text-classification")


def _registered_task(model: str | None, store: str | None) -> str | None:
    """The task of a registered `NAME[@VERSION]`, read from the registry (None: not a registered name)."""
    from hfbatch.tasks.core.registry import Registry
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.core.store import Store

    if not model or Path(model).expanduser().exists():
        return None
    name, _, version = model.partition("@")
    if not Registry.valid_name(name):
        return None
    registry = Registry(Store.open(Settings(), store), name)
    with contextlib.suppress(HfbatchError):
        return registry.task(registry.resolve(version or None)) if registry.exists() else None
    return None


def warm_up(command: str, plan) -> threading.Thread | None:
    """Begin loading, on a background thread, what the flow loads first, while the flow run starts (and
    a temporary Prefect server comes up): the predictor of an inference whose shards run in this
    process (they take it from the predictors' cache, waiting for it if need be), else the transformers
    module of the model's architecture and, for an evaluation, the libraries it reads, scores and plots
    with (seconds to import). A failure is left for the flow to meet and report."""
    if command == "infer":
        target = plan.spec.predictor.load if plan.in_process else lambda: _import_architecture(plan.model.path)
    elif command == "evaluate":
        target = lambda: _import_architecture(plan.model.path, evaluation=True)
    else:
        return None

    def quietly() -> None:
        with contextlib.suppress(Exception):
            target()

    thread = threading.Thread(target=quietly, name="hfbatch-warm-up", daemon=True)
    thread.start()
    return thread


def _import_architecture(path: str, evaluation: bool = False) -> None:
    if evaluation:  # its first step reads the data with datasets
        import datasets  # noqa: F401
    import transformers

    for architecture in json.loads((Path(path) / "config.json").read_text()).get("architectures") or ():
        getattr(transformers, architecture, None)
    if evaluation:  # then scores with evaluate and plots
        import evaluate  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401


__all__ = ["COMMANDS", "ConfigError", "flows", "run"]
