"""What a task takes besides its data: the base of every training recipe's and predictor's options.

Options are pydantic models: immutable and hashable (they are part of cache keys), each field with its
type, constraints and description. A flow takes each task's options as one parameter of its own (the
`question_answering` options, the `translation` options, ...), so the same name can mean different
things in two tasks, and the command line, the Prefect UI's run form and the deployments' parameters
come from these fields.
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hfbatch.tasks.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Base of every task's options; a field the task does not have is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def columns(self) -> dict[str, str]:
        """The data columns these options name (fields called `*_column` that are set)."""
        return {k: v for k, v in self.model_dump().items() if k.endswith("_column") and v is not None}

    def ingest_key(self) -> dict:
        """What the ingested rows depend on besides the source: the columns named, and any option that
        shapes the prepared rows (a task's prompt template)."""
        return self.columns()


class NoOptions(Options):
    """The options of a task that takes none."""


def param_name(task: str) -> str:
    """The flow parameter holding `task`'s options: `question-answering` -> `question_answering`."""
    return task.replace("-", "_")


def validated(model: type[M], values: dict[str, Any], where: str = "") -> M:
    """`model` of `values`; invalid values are one `ConfigError` naming each option (as the command line
    spells it) and its problem, e.g. `--top-p: Input should be less than or equal to 1 (got 1.5)`."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(f"invalid option{'s' if len(e.errors()) > 1 else ''}{where}: "
                          + "; ".join(problem(err) for err in e.errors())) from None


def problem(err: Any) -> str:
    """One pydantic error as `--option: message (got value)`."""
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    flag = f"--{loc[-1].replace('_', '-')}" if loc else "options"
    if err["type"] == "missing":
        return f"{flag} is required"
    if err["type"] == "extra_forbidden":
        return f"{flag}: no such option"
    message = err["msg"].removeprefix("Value error, ")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, BaseModel)) else ""
    return f"{flag}: {message}{got}"
