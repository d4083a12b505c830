"""The artifact store: one fsspec URL (a local directory or `s3://...`) that holds every output.

Layout under the store root::

    datasets/<fingerprint>/          ingested Arrow data (`Dataset.save_to_disk`)
    tokenized/<fingerprint>/         tokenized Arrow data
    runs/<run key>/checkpoints/      Trainer checkpoints, mirrored during training
    runs/<run key>/model/            final model + tokenizer (safetensors) and README.md model card
    evals/<eval key>/                the metrics and the task's detail files
    models/<name>/registry.json      versions, champion and promotion history of one model name
    models/<name>/<version>/         a registered version: model files, card, metrics
    prefect-results/                 Prefect task results (the cache shared by every worker)
    results/<predictor key>/         batch inference's results kept for reuse (`tasks/batch/results.py`)
    _staging/                        directories and files being written (local stores)
    _locks/                          lock files of read-modify-write updates (local stores)

A directory is complete only when its `_SUCCESS` marker exists; the marker is written last, so a
crash mid-write leaves a directory that every reader treats as absent and the next run rewrites.
Every step computes its output through `memoize`: once per content key, whichever process asks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from hfbatch.tasks.core.refs import Ref
from hfbatch.tasks.core.settings import DEFAULT_CACHE_DIR, Settings

MARKER = "_SUCCESS"
STAGING = "_staging"
R = TypeVar("R", bound=Ref)


class Store:
    """An artifact store rooted at an fsspec URL (`options`: fsspec storage options). Files fetched
    from a remote store are cached under `cache_dir`."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, cache_dir: Path = DEFAULT_CACHE_DIR):
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        self.cache_dir = Path(cache_dir)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        self.is_local = "file" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol)

    @classmethod
    def open(cls, settings: Settings, url: str | None = None) -> Store:
        """The store at `url` (default: the settings' store) with the settings' storage options."""
        url = url or settings.store
        return cls(url, settings.storage_options(url), settings.cache_dir)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __reduce__(self):  # pickled (Dask, Prefect results) as its constructor arguments, not its file system
        return Store, (self.url, self.options, self.cache_dir)

    def uri(self, key: str) -> str:
        """The full URL of `key` (a `/`-separated path under the store root)."""
        return f"{self.url}/{key}" if key else self.url

    def path(self, key: str) -> str:
        """The file system path of `key` (for `self.fs`)."""
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def is_complete(self, key: str) -> bool:
        """Whether the directory `key` was committed (its marker exists)."""
        return self.fs.exists(self.path(f"{key}/{MARKER}"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.fs.cat_file(self.path(key)))  # one GET: never a read of two versions

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write `key` atomically: a file in `_staging/`, synced and renamed into place, on a local
        store; one PUT, atomic already, on an object store."""
        if not self.is_local:
            self.fs.pipe_file(self.path(key), data)
            return
        os.replace(self._staged_file(key, data), self.path(key))

    def _staged_file(self, key: str, data: bytes) -> str:
        """`data` written and synced to a new file in `_staging/` (local stores), to be moved to `key`."""
        os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
        os.makedirs(self.path(STAGING), exist_ok=True)
        tmp = os.path.join(self.path(STAGING), uuid.uuid4().hex)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: name the file it was writing, leave no partial file
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OSError(e.errno, e.strerror, self.uri(key)) from e
        return tmp

    def create_json(self, key: str, obj: Any) -> bool:
        """Write `key` only if it does not exist yet, atomically (a hard link on a local store, an S3
        conditional PUT otherwise): True if this call created it, False if it was there."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        if not self.is_local:
            try:
                self.fs.pipe_file(self.path(key), data, mode="create")
            except FileExistsError:
                return False
            return True
        tmp = self._staged_file(key, data)
        try:
            os.link(tmp, self.path(key))
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def update_json(self, key: str, change: Callable[[Any], Any], attempts: int = 20) -> Any:
        """Read-modify-write of the JSON file `key` (None while it does not exist) without losing a
        concurrent writer's update: under a file lock on a local store, by compare-and-swap on S3 (a
        conditional PUT on the ETag read, retried on conflict). `change` returns the new content; it
        may run more than once. Returns what was written."""
        if self.is_local:
            with self._locked(key):
                new = change(self.read_json(key) if self.exists(key) else None)
                self.write_json(key, new)
                return new
        for _ in range(attempts):
            try:
                with self.fs.open(self.path(key), "rb") as f:  # reads are pinned to the ETag it found
                    current, etag = json.load(f), f.details["ETag"]
            except FileNotFoundError:
                etag, current = None, None
            except OSError as e:
                if type(e).__name__ == "FileExpired":  # replaced while being read
                    continue
                raise
            new = change(current)
            data = json.dumps(new, indent=2, sort_keys=True, default=str).encode()
            try:
                if etag is None:
                    self.fs.pipe_file(self.path(key), data, mode="create")
                else:
                    self.fs.pipe_file(self.path(key), data, IfMatch=etag)
                return new
            except FileExistsError:
                continue
            except OSError as e:
                if "pre-condition" not in str(e) and "Precondition" not in str(e):
                    raise
        raise TimeoutError(f"{self.uri(key)} kept changing under {attempts} attempts to update it")

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive lock (fcntl) for `key` among the processes of this machine."""
        import fcntl

        lock_dir = self.path("_locks")
        os.makedirs(lock_dir, exist_ok=True)
        with open(os.path.join(lock_dir, hashlib.sha256(key.encode()).hexdigest()[:24]), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def remove(self, key: str) -> None:
        if self.fs.exists(self.path(key)):
            self.fs.rm(self.path(key), recursive=True)

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (empty if it does not exist)."""
        if not self.fs.exists(self.path(key)):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(key), detail=False))

    def committed(self, key: str, ref_type: type[R]) -> R | None:
        """The reference in the marker of the committed directory `key`, or None if there is none."""
        return ref_type.from_meta(self.read_json(f"{key}/{MARKER}")) if self.is_complete(key) else None

    def memoize(self, key: str, ref_type: type[R], produce: Callable[[Path], R]) -> R:
        """The reference committed at `key`, or else the one `produce` returns after filling a staging
        directory, which is then committed as `key` with the reference in its marker. Compute once per
        content key: every step's output goes through here."""
        done = self.committed(key, ref_type)
        if done is not None:
            return done
        with self._scratch() as tmp:
            ref = produce(tmp)
            self.commit_dir(tmp, key, ref.to_meta(), move=True)
        return ref

    @contextlib.contextmanager
    def staging(self, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a local directory to fill; on success commit it as `key`, marker (holding `meta`) last.
        If the block raises, nothing is committed and an earlier complete `key` is left as it was."""
        with self._scratch() as tmp:
            yield tmp
            self.commit_dir(tmp, key, meta, move=True)

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A temporary local directory, removed afterwards: inside the store on a local one (so that a
        commit is a rename), in the system's temporary directory otherwise."""
        if self.is_local:
            os.makedirs(self.path(STAGING), exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.path(STAGING)))
        else:
            tmp = Path(tempfile.mkdtemp(prefix="hfbatch-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit_dir(self, local_dir: str | Path, key: str, meta: dict | None = None, move: bool = False) -> None:
        """Copy (or, on a local store, move) `local_dir` to `key`, then write the marker."""
        local_dir = Path(local_dir)
        (local_dir / MARKER).unlink(missing_ok=True)
        self.remove(key)
        dest = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if move:
                os.replace(local_dir, dest)
            else:
                shutil.copytree(local_dir, dest)
        else:
            self.fs.put(str(local_dir) + "/", dest, recursive=True)
        self.write_json(f"{key}/{MARKER}", meta or {})

    def clean_staging(self, older_than: float = 3600.0) -> None:
        """Remove what crashed writers left in `_staging/` (local stores). Only entries older than
        `older_than` seconds: a younger one may be another process's write in progress."""
        root = Path(self.path(STAGING))
        if not self.is_local or not root.exists():
            return
        cutoff = time.time() - older_than
        for entry in root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.lstat().st_mtime < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def local_dir(self, key: str) -> Path:
        """A local path holding the complete directory `key`: the path itself on a local store,
        otherwise a download into the local cache (keys are content-addressed, so it never goes stale)."""
        if not self.is_complete(key):
            raise FileNotFoundError(f"{self.uri(key)} is not a complete artifact (no {MARKER} marker)")
        if self.is_local:
            return Path(self.path(key))
        cached = self.cache_dir / "store" / hashlib.sha256(self.uri(key).encode()).hexdigest()[:24]
        if (cached / MARKER).exists():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=cached.parent))
        try:
            self.fs.get(self.path(key) + "/", str(tmp) + "/", recursive=True)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cached

    def load_dataset(self, key: str):
        """The `datasets` dataset committed at `key` (memory-mapped Arrow)."""
        import datasets

        return datasets.load_from_disk(str(self.local_dir(key)))
