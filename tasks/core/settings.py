"""Settings of the machine a command runs on, read from `HFBATCH_*` environment variables.

They are read once, where a command or flow starts (`Settings()`), and passed down as an argument;
nothing below reads the environment.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DEFAULT_CACHE_DIR = Path(os.path.expanduser("~/.cache/hfbatch"))
S3FS_TRIES = 5
"""s3fs tries each call this many times on timeouts and connection errors (`S3FileSystem.retries`)."""


class Settings(BaseSettings):
    """hfbatch settings (environment variables `HFBATCH_STORE`, `HFBATCH_CACHE_DIR`, ...)."""

    model_config = SettingsConfigDict(env_prefix="HFBATCH_", frozen=True)

    store: str = "./hfbatch-store"
    """Artifact store: a local directory or an fsspec URL such as `s3://bucket/prefix`."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Local cache for files fetched from a remote store (content-addressed, safe to delete)."""
    storage_block: str | None = None
    """Name of a saved Prefect `RemoteFileSystem` block whose `settings` (endpoint, credentials) are the
    fsspec options for `s3://` URLs; without it botocore finds them in the usual `AWS_*` variables."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off by default)."""
    allow_pickle_weights: bool = False
    """Accept `pytorch_model.bin` (pickle) weights; by default only safetensors load."""
    device: Device = "auto"
    """Where models train and predict: `auto` uses CUDA when a GPU is there; `cpu` keeps a GPU host's
    work on its CPU; `cuda` fails instead of falling back to the CPU."""
    cpu_kernels: Literal["onednn", "aten"] = "onednn"
    """Linear layers of fp32 inference on a CPU: `onednn` runs them on weights packed once for oneDNN
    (`tasks/inference/onednn.py`: faster, equal up to rounding), `aten` on torch's default kernels."""
    alert_block: str = "custom-webhook/hfbatch-alerts"
    """The Prefect notification block the alerts of `hfbatch serve` / `hfbatch deploy` send through, as
    `<block type slug>/<block name>` (e.g. `slack-webhook/ops`, `sendgrid-email/ops`)."""
    alert_webhook_url: str | None = None
    """If set, `hfbatch serve` / `deploy` save this URL as the `custom-webhook` block `alert_block` names."""
    s3_connect_timeout: float = 5.0
    """Seconds to wait for an S3 endpoint to accept a connection."""
    s3_read_timeout: float = 5.0
    """Seconds to wait for each answer of an S3 endpoint. s3fs tries each request 5 times, and one file
    operation may make two requests: a stalled endpoint fails in about a minute with the defaults."""
    s3_attempts: int = 1
    """botocore's attempts per request of s3fs's 5 tries (botocore's own default is 5: 25 requests)."""
    api_timeout: float = 10.0
    """Seconds to wait for each answer of the Prefect API (`PREFECT_API_REQUEST_TIMEOUT`, unless set)."""
    progress_interval: float = 30.0
    """Seconds between the progress lines of a long step (training, evaluation) when there is no terminal
    (a scheduler's or Prefect worker's log): percent done, rate, time left."""
    verbose: bool = False
    """Let the libraries (datasets, transformers, huggingface_hub) show their own progress bars and load
    reports; off, hfbatch's own progress and warnings are the run's lines."""
    inference_deadline: float = 7200.0
    """Seconds a batch-inference run may take from its start (or from being late) before an alert says
    it did not complete in time."""

    def with_overrides(self, **values: Any) -> Settings:
        """These settings with the values that are not None replaced (a flow's `store`, `device`)."""
        values = {k: v for k, v in values.items() if v is not None}
        return self.model_copy(update=values) if values else self

    def storage_options(self, url: str) -> dict[str, Any]:
        """fsspec options for `url`: for S3, the settings of the block `storage_block` if one is named,
        and the timeouts and attempts above where the block sets none."""
        if not url.startswith(("s3://", "s3a://")):
            return {}
        options = copy.deepcopy(_block_settings(self.storage_block)) if self.storage_block else {}
        config = options.setdefault("config_kwargs", {})
        config.setdefault("connect_timeout", self.s3_connect_timeout)
        config.setdefault("read_timeout", self.s3_read_timeout)
        config.setdefault("retries", {"max_attempts": self.s3_attempts, "mode": "standard"})
        return options

    def s3_wait(self) -> str:
        """How long a stalled S3 endpoint is waited for, in words (for the error that says it did not answer)."""
        return (f"{S3FS_TRIES} tries of each request, {self.s3_attempts} attempt(s) each, waiting "
                f"{self.s3_connect_timeout:g} s to connect and {self.s3_read_timeout:g} s for an answer "
                "(HFBATCH_S3_CONNECT_TIMEOUT, HFBATCH_S3_READ_TIMEOUT, HFBATCH_S3_ATTEMPTS)")


@functools.lru_cache(maxsize=8)
def _block_settings(name: str) -> dict[str, Any]:
    from prefect.filesystems import RemoteFileSystem

    block: Any = RemoteFileSystem.load(name)  # a block (Prefect's sync/async loader types both)
    return dict(block.settings)
