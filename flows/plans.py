"""A flow's plan: what it works out before its first task (parameters checked, inputs listed and
fingerprinted, the model resolved, the output checked), computed once per run.

The command line computes a flow's plan before the flow run starts, so that a bad input is answered in
seconds and without a flow run; the run then takes that plan (`take`) instead of computing it again, so
every input file is listed and hashed once. A flow run started any other way (a deployment, a test)
computes its own.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from hfbatch.tasks.core.fingerprint import digest

P = TypeVar("P")
_ready: dict[str, object] = {}
_lock = threading.Lock()


def _key(kind: str, params: BaseModel) -> str:
    return digest("plan", kind, params.model_dump(mode="json"))


def prepare(kind: str, params: BaseModel, compute: Callable[[BaseModel], P]) -> P:
    """`compute(params)`, kept for the next run of `kind` with these very parameters."""
    plan = compute(params)
    with _lock:
        _ready[_key(kind, params)] = plan
    return plan


def take(kind: str, params: BaseModel, compute: Callable[[BaseModel], P]) -> P:
    """The plan `prepare` computed for these parameters (once), else `compute(params)`."""
    with _lock:
        plan = _ready.pop(_key(kind, params), None)
    return plan if plan is not None else compute(params)  # type: ignore[return-value]
