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

    exit_code = 2


class DataError(HfbatchError):
    """A data source is missing, unreadable, empty, or lacks a column or label; the message names it."""


class InputChangedError(DataError):
    """An input was rewritten after the run planned it: what a step would read is not what was
    fingerprinted, so it stops rather than mix two versions of the data."""


class ModelError(HfbatchError):
    """A model source is missing, has no (safe) weights, or cannot be resolved."""

    def __init__(self, message: str, hub_problem: str | None = None):
        super().__init__(message)
        self.hub_problem = hub_problem or message


class ConfigError(HfbatchError):
    """A parameter is out of range or inconsistent."""


class IntegrityError(HfbatchError):
    """A finished run's output does not account for every input row exactly once."""


class ServiceError(HfbatchError):
    """A service or storage from outside failed (an endpoint that does not answer, a Prefect API that is
    down, a full disk), after the retries it was worth: exit status 3; committed work is kept."""

    exit_code = 3


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


NETWORK_FAILURES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectTimeout",
                    "ReadTimeout", "ConnectError", "ClientConnectorError", "ServerTimeoutError",
                    "ConnectionRefusedError", "TimeoutError", "timeout", "ProxyConnectionError")
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def outside_failure(exc: BaseException, s3_wait: str = "") -> HfbatchError | None:
    """The one-line error a failure from outside hfbatch stands for, or None for anything else (a bug,
    reported with its traceback). Follows the causes of `exc` (a library's wrapper of a network error):
    an endpoint that did not connect or answer (`ServiceError`, exit 3; `s3_wait` says how long it was
    waited for), a full disk (exit 3), a missing or forbidden file, damaged weights, missing or refused
    credentials (exit 2). The message names the URL or file the failure names."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        found = _outside(cause, s3_wait)
        if found is not None:
            return found
        cause = cause.__cause__ or cause.__context__
    return None


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` is a service or storage failing from outside (`ServiceError`): wrappers that turn a
    library's error into a `DataError` naming the input let these pass, to be reported as what they are."""
    return isinstance(outside_failure(exc), ServiceError)


def _outside(exc: BaseException, s3_wait: str) -> HfbatchError | None:
    name, module = type(exc).__name__, type(exc).__module__.split(".")[0]
    if isinstance(exc, HfbatchError):
        return exc
    if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return ServiceError(f"no space left on the device{where}: free some and rerun (committed work is kept, "
                            "a rerun continues from it)")
    if name in NETWORK_FAILURES or (module in ("botocore", "aiobotocore", "aiohttp") and "Connect" in name):
        url = _url_of(exc)
        s3 = module in ("botocore", "aiobotocore", "aiohttp", "s3fs")
        waited = f" after {s3_wait}" if s3 and s3_wait else ""
        return ServiceError(f"{url or 'an endpoint'} did not answer ({name}: {exc}){waited}")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ConfigError(f"no usable credentials for S3 ({exc}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "or HFBATCH_STORAGE_BLOCK")
    if isinstance(exc, PermissionError):
        return ConfigError(f"permission denied: {exc.filename or exc}")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return DataError(f"{exc.filename} does not exist (removed while hfbatch was using it?)")
    if name == "SafetensorError":
        return ModelError(f"damaged model weights (a safetensors file that does not read back: {exc})")
    return None


def _url_of(exc: BaseException) -> str | None:
    """The endpoint a network error names: httpx's request, botocore's `endpoint_url`, aiohttp's host."""
    try:
        request = getattr(exc, "request", None)  # httpx raises RuntimeError where none was set
    except RuntimeError:
        request = None
    url = getattr(request, "url", None)
    if url is not None:
        return str(url)
    kwargs = getattr(exc, "kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
        return str(kwargs["endpoint_url"])
    key = getattr(exc, "host", None) or getattr(getattr(exc, "os_error", None), "filename", None)
    return str(key) if key else None
