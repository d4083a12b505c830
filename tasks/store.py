"""The artifact store: one fsspec URL (a local directory or `s3://...`) that holds every output.

Layout under the store root::

    datasets/<fingerprint>/          ingested Arrow data (`Dataset.save_to_disk`)
    tokenized/<fingerprint>/         tokenized Arrow data
    runs/<run key>/checkpoints/      Trainer checkpoints, mirrored during training
    runs/<run key>/model/            final model + tokenizer (safetensors) and README.md model card
    evals/<eval key>/                metrics.json, per_class.json, confusion_matrix.json
    models/<name>/registry.json      versions, champion and promotion history of one model name
    models/<name>/<version>/         a registered version: model files, card, metrics
    prefect-results/                 Prefect task results (the cache shared by every worker)

A directory is complete only when its `_SUCCESS` marker exists; the marker is written last, so a
crash mid-write leaves a directory that every reader treats as absent and the next run rewrites.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec

from .settings import get_settings

MARKER = "_SUCCESS"


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`: for S3, the settings of the Prefect block `HFBATCH_STORAGE_BLOCK` if
    one is named, else the endpoint from the usual AWS environment variables (credentials too are
    then found by botocore in the environment)."""
    if url.startswith(("s3://", "s3a://")):
        block = get_settings().storage_block
        if block:
            from prefect.filesystems import RemoteFileSystem

            return dict(RemoteFileSystem.load(block).settings)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


class Store:
    """An artifact store rooted at an fsspec URL."""

    def __init__(self, url: str | None = None):
        url = url or get_settings().store
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
        self.url = url.rstrip("/")
        self.options = storage_options(self.url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def uri(self, key: str) -> str:
        """The full URL of `key` (a `/`-separated path under the store root)."""
        return f"{self.url}/{key}" if key else self.url

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def is_complete(self, key: str) -> bool:
        """Whether the directory `key` was committed (its marker exists)."""
        return self.fs.exists(self._path(f"{key}/{MARKER}"))

    def read_json(self, key: str) -> Any:
        with self.fs.open(self._path(key), "r") as f:
            return json.load(f)

    def write_json(self, key: str, obj: Any) -> None:
        """Write a small JSON file atomically (a local rename; an S3 PUT is atomic already)."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self.write_bytes(key, data)

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def remove(self, key: str) -> None:
        if self.fs.exists(self._path(key)):
            self.fs.rm(self._path(key), recursive=True)

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (empty if it does not exist)."""
        if not self.fs.exists(self._path(key)):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(key), detail=False))

    @contextlib.contextmanager
    def staging(self, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a local directory to fill; on success commit it as `key`, marker last.

        On a local store the staging directory sits in the store itself and is renamed into place;
        on a remote store it is a temporary directory uploaded after the block ends. If the block
        raises, nothing is committed and an earlier complete `key` is left as it was.
        """
        if self.is_local:
            staging_root = Path(self._path("_staging"))
            staging_root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=staging_root))
        else:
            tmp = Path(tempfile.mkdtemp(prefix="hfbatch-"))
        try:
            yield tmp
            self.commit_dir(tmp, key, meta, move=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit_dir(self, local_dir: str | Path, key: str, meta: dict | None = None, move: bool = False) -> None:
        """Copy (or, on a local store, move) `local_dir` to `key`, then write the marker."""
        local_dir = Path(local_dir)
        (local_dir / MARKER).unlink(missing_ok=True)
        self.remove(key)
        dest = self._path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if move:
                os.replace(local_dir, dest)
            else:
                shutil.copytree(local_dir, dest)
        else:
            self.fs.put(str(local_dir) + "/", dest, recursive=True)
        self.write_json(f"{key}/{MARKER}", meta or {})

    def local_dir(self, key: str) -> Path:
        """A local path holding the complete directory `key`: the path itself on a local store,
        otherwise a download into the local cache (keys are content-addressed, so it never goes stale)."""
        if not self.is_complete(key):
            raise FileNotFoundError(f"{self.uri(key)} is not a complete artifact (no {MARKER} marker)")
        if self.is_local:
            return Path(self._path(key))
        digest = hashlib.sha256(self.uri(key).encode()).hexdigest()[:24]
        cached = get_settings().cache_dir / "store" / digest
        if (cached / MARKER).exists():
            return cached
        tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=cached.parent if cached.parent.exists() else None))
        try:
            self.fs.get(self._path(key) + "/", str(tmp) + "/", recursive=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cached


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
