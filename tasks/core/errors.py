"""What can go wrong, and which of it is worth retrying.

`HfbatchError`s are problems with the user's input or configuration: deterministic, never retried,
reported as one clear message. `is_transient` decides what a task retries: only failures that may pass
by themselves (a dropped connection, a timeout, an HTTP 5xx or 429, an S3 slow-down, a Dask worker that
died under a task or a closed Dask connection); never a programming error such as a `TypeError`.
"""
from __future__ import annotations

import errno

TRANSIENT_ERRNOS = {errno.EIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "TooManyRequests", "RequestLimitExceeded"}
# distributed.KilledWorker: the workers running a task died (killed, out of memory, preempted);
# distributed.comm.core.CommClosedError (an OSError without errno): a connection to a scheduler or worker closed
TRANSIENT_DASK = {"KilledWorker", "CommClosedError"}


class HfbatchError(Exception):
    """Base class: a problem with the user's input or configuration, not a transient failure."""


class DataError(HfbatchError):
    """A data source is missing, unreadable, empty, or lacks a column or label; the message names it."""


class ModelError(HfbatchError):
    """A model source is missing, has no (safe) weights, or cannot be resolved."""

    def __init__(self, message: str, hub_problem: str | None = None):
        super().__init__(message)
        self.hub_problem = hub_problem or message


class ConfigError(HfbatchError):
    """A parameter is out of range or inconsistent."""


class IntegrityError(HfbatchError):
    """A finished run's output does not account for every input row exactly once."""


class TransientError(Exception):
    """A failure hfbatch itself knows may pass (e.g. a read that stopped short): always retried."""


class TransientReadError(TransientError, OSError):
    """A read failed in a way a second attempt may not (the file's data read back fine once more)."""


PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, LookupError, ValueError, AssertionError, ImportError,
                      NotImplementedError, RecursionError)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure that may pass on a retry: by its own type, or by the exception it was
    raised from (`raise ... from e`: a library's wrapper around a network error). A programming error
    or an `HfbatchError` never is, whatever it was raised from."""
    if isinstance(exc, (HfbatchError, *PROGRAMMING_ERRORS)):
        return False
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if _transient(cause):
            return True
        cause = cause.__cause__
    return False


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
        return True
    if type(exc).__module__.split(".")[0] == "distributed":
        return type(exc).__name__ in TRANSIENT_DASK
    if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "httpx", "urllib3",
                                                 "requests", "huggingface_hub"):
        return _transient_client_error(exc)
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS  # s3fs raises OSError(EIO) for a 5xx


def _transient_client_error(exc: BaseException) -> bool:
    """Network client exceptions: connection and timeout classes by name, HTTP errors by status."""
    name = type(exc).__name__
    if any(word in name for word in ("Connect", "Connection", "Timeout", "Transport", "Disconnected",
                                     "ProtocolError", "ReadError", "IncompleteRead")):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in TRANSIENT_CODES or status in TRANSIENT_STATUS
    status = getattr(response, "status_code", None) or getattr(exc, "status", None)
    return status in TRANSIENT_STATUS
