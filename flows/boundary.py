"""The command line's error boundary: which failures the command reports as one line (the user's input or
configuration, exit 2; a service or storage failing from outside, exit 3) and holding their records out
of Prefect's console log, where the command's own line says it."""
from __future__ import annotations

import contextlib
import logging

from hfbatch.tasks.core.errors import HfbatchError, outside_failure


def reported_error(error: BaseException) -> HfbatchError | None:
    """The one-line error the command reports for `error`: the user's input or configuration (exit 2), or
    a failure from outside (`outside_failure`: storage, a service; exit 3); None for a bug."""
    if isinstance(error, HfbatchError):
        return error
    if not isinstance(error, Exception):
        return None
    from hfbatch.tasks.core.settings import Settings

    return outside_failure(error, Settings().s3_wait())


class _FailuresHeld(logging.Filter):
    """Holds back, from Prefect's console log, the records of a failure (errors, and the runs' "Finished in
    state Failed" lines) until the command ends: those about the error the command reports itself (an
    `HfbatchError`: one line, no traceback) are dropped then, the others printed. A record that carries
    such an error (its traceback) is dropped at once. They all reach the Prefect run log (the API handler)."""

    def __init__(self):
        super().__init__()
        self.held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self.handler: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and reported_error(record.exc_info[1]) is not None:
            return False
        if record.levelno >= logging.ERROR or record.getMessage().startswith("Finished in state Failed"):
            assert self.handler is not None
            self.held.append((self.handler, record))
            return False
        return True

    def release(self, error: BaseException | None) -> None:
        """Print what was held, except the records that are about `error`, a user error the command reports."""
        told = str(error) if error is not None and reported_error(error) is not None else None
        for handler, record in self.held:
            if told is None or told not in record.getMessage():
                handler.handle(record)  # past the filters: this one held it


@contextlib.contextmanager
def user_errors_quiet(enabled: bool):
    if not enabled:
        yield
        return
    import prefect.logging  # noqa: F401  (sets up Prefect's handlers)

    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    filters = []
    for handler in handlers:
        held = _FailuresHeld()
        held.handler = handler
        handler.addFilter(held)
        filters.append(held)
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        for handler, held in zip(handlers, filters):
            handler.removeFilter(held)
            held.release(error)
