"""One settings model for every process: read from `HFBATCH_*` environment variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """hfbatch settings (environment variables `HFBATCH_STORE`, `HFBATCH_CACHE_DIR`, ...)."""

    model_config = SettingsConfigDict(env_prefix="HFBATCH_")

    store: str = "./hfbatch-store"
    """Artifact store: a local directory or an fsspec URL such as `s3://bucket/prefix`."""
    cache_dir: Path = Path(os.path.expanduser("~/.cache/hfbatch"))
    """Local cache for files fetched from a remote store (content-addressed, safe to delete)."""
    storage_block: str | None = None
    """Name of a saved Prefect `RemoteFileSystem` block whose `settings` (endpoint, credentials) are the
    fsspec options for `s3://` URLs; without it they come from the usual `AWS_*` variables."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off by default)."""
    allow_pickle_weights: bool = False
    """Accept `pytorch_model.bin` (pickle) weights; by default only safetensors load."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models train and predict: `auto` uses CUDA when a GPU is there; `cpu` keeps a GPU host's
    work on its CPU; `cuda` fails instead of falling back to the CPU."""


def get_settings() -> Settings:
    return Settings()
