"""Retry policy: only failures that may pass are retried, through the real Prefect task machinery."""
import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect import flow, task

from hfbatch.tasks.core.errors import DataError, TransientReadError, is_transient
from hfbatch.tasks.prefect_tasks import RETRIES


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_transient_failures_are_told_from_bad_input_and_bugs():
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    transient = [ConnectionResetError("reset by peer"), TimeoutError("read timed out"),
                 KilledWorker("infer_shard_task-0f3a", "tcp://127.0.0.1:40001", allowed_failures=0),
                 CommClosedError("in <TCP (closed) ConnectionPool.gather local=tcp://127.0.0.1:5>: Stream is closed"),
                 OSError(errno.EIO, "We encountered an internal error. Please try again."),  # s3fs: an S3 5xx
                 _client_error("SlowDown", 503), _client_error("InternalError", 500), _client_error("Throttling", 400),
                 EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), TransientReadError("read stopped short")]
    permanent = [TypeError("unsupported operand"), AttributeError("no attribute 'x'"), KeyError("k"),
                 DataError("row 3: column 'text' is null"), _client_error("NoSuchKey", 404),
                 _client_error("AccessDenied", 403), FileNotFoundError(errno.ENOENT, "missing"), RuntimeError("?")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    try:  # a library's wrapper around a network error is retried; a bug raised while handling one is not
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise TypeError("bug in the handler") from e
    except TypeError as bug:
        assert not is_transient(bug)


def test_a_type_error_in_a_task_is_not_retried_and_a_dropped_connection_is(prefect_harness):
    calls = {"bug": 0, "flaky": 0}
    fast = {**RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None}  # the real condition, no waiting

    @task(**fast)
    def bug():
        calls["bug"] += 1
        return len(None)  # TypeError

    @task(**fast)
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    @flow
    def run():
        with pytest.raises(TypeError):
            bug()
        return flaky()

    assert run() == "done"
    assert calls == {"bug": 1, "flaky": 3}
