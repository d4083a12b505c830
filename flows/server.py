"""The temporary Prefect server of a command run without a Prefect API (`PREFECT_API_URL`).

It is Prefect's own ephemeral server (the same app, UI and services off, its SQLite database in
`PREFECT_HOME`), started by the CLI as its very first step instead of at the first API call: its
start-up (seconds: it imports the whole server and checks the database) then overlaps the command's own
imports, checks and model loading, and the command's process never imports the server itself. The
command's process and its children (Dask workers) reach it through `PREFECT_API_URL`, set before
Prefect is imported. It is stopped when the command exits, and on Linux also when the command dies
(a parent-death signal).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

from hfbatch.tasks.core.errors import ServiceError

_temporary: TemporaryServer | None = None


def configured_api_url() -> str | None:
    """The Prefect API this process would use, found without importing Prefect (which takes seconds):
    `PREFECT_API_URL` from the environment, else from the active profile (`prefect config set`). Read
    through Prefect's settings once Prefect is imported (the API of a test harness, say)."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value()
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def temporary_api_url() -> str | None:
    """The API URL of the temporary server this process started, if it did."""
    return _temporary.api_url if _temporary else None


def ready() -> None:
    """Wait for the temporary server this process started, if it did (before the first API call)."""
    if _temporary:
        _temporary.wait()


def check_api(timeout: float) -> None:
    """A configured Prefect API (not the temporary server) answers its health check within `timeout`
    seconds; else a `ServiceError` naming its URL and the wait, before any work starts."""
    url = configured_api_url()
    if not url or url == temporary_api_url():
        return
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except OSError as e:  # refused, timed out, unknown host, an HTTP error status
        problem = str(getattr(e, "reason", None) or e)
    raise ServiceError(f"the Prefect API {url} did not answer its health check ({problem}; waited "
                       f"{time.monotonic() - started:.1f} s of HFBATCH_API_TIMEOUT={timeout:g} s): start that "
                       "server, or unset PREFECT_API_URL to run on a temporary local one")


def client_limits(timeout: float) -> None:
    """Bound each Prefect API request to `timeout` seconds and 2 retries (Prefect's defaults: 60 s and 5),
    unless the user set them; before Prefect reads its settings."""
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", f"{timeout:g}")
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")


def start_unless_configured() -> TemporaryServer | None:
    """Start the temporary server and point this process at it, unless an API is configured (or Prefect,
    already imported here, has settled on its own)."""
    global _temporary
    if "prefect" in sys.modules or configured_api_url():
        return None
    if os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower() in ("0", "false", "no", "off"):
        return None
    _temporary = TemporaryServer()
    os.environ["PREFECT_API_URL"] = _temporary.api_url
    return _temporary


class TemporaryServer:
    """Prefect's ephemeral server app under uvicorn on a free port of 127.0.0.1, as
    `prefect.server.api.server.SubprocessASGIServer` runs it."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        # a server of one command: no UI, and no telemetry heartbeat (it contends with the command's own
        # writes for the SQLite database, and a locked database printed a traceback); a user's setting wins
        env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ, "PREFECT_UI_ENABLED": "0",
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # its output goes to a file of its own, shown if it fails to start: a server stopped while its
        # services run prints their cancellation (tracebacks) on the way out, noise on a command's stderr
        self.log = tempfile.NamedTemporaryFile(prefix="hfbatch-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.stop)

    def wait(self, timeout: float | None = None) -> None:
        """Return once the server answers its health check; a `ServiceError` if it exits or takes longer
        than `timeout` (default: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, else 120 s)."""
        timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"the temporary Prefect server exited with status {self.proc.returncode}: "
                                   f"{self.output()[-800:]!r}; or set PREFECT_API_URL to a running server")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServiceError(f"the temporary Prefect server did not answer within {timeout:.0f} s; raise "
                          "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server")

    def output(self) -> str:
        """What the server printed (its log file)."""
        try:
            return Path(self.log.name).read_text(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def _die_with_parent() -> None:
    """In the server's process, before it runs: SIGTERM it when the command's process dies, however it
    dies (prctl PR_SET_PDEATHSIG), so that a killed command leaves no server behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
