"""Data sources: parse a SRC string, fingerprint its content, and load it as a `datasets.Dataset`.

SRC is one of
- a local file or directory of CSV, JSON/JSONL or Parquet files;
- an `s3://bucket/key` file or prefix (endpoint from `AWS_ENDPOINT_URL`);
- a Hugging Face Hub dataset `ID[:CONFIG][#SPLIT]` (split defaults to `train`, any `datasets`
  split expression such as `train[:2000]` works), pinned to the revision it resolves to.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from hfbatch.tasks.core.errors import DataError, is_outage
from hfbatch.tasks.core.fingerprint import digest, file_fingerprint

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Source:
    kind: str  # "file" (local or remote fsspec files) or "hub"
    uri: str
    files: tuple[str, ...] = ()
    config: str | None = None
    split: str = "train"


def parse_source(src: str, options: dict[str, Any] | None = None) -> Source:
    """Resolve SRC to a local/remote file list or a hub dataset; raise `DataError` naming SRC if neither.
    `options`: fsspec storage options for a remote SRC."""
    if "://" in src and not src.startswith("file://"):
        fs, root = fsspec.core.url_to_fs(src, **(options or {}))
        protocol = src.split("://", 1)[0]
        try:
            files = _data_files(fs, root)
        except (OSError, PermissionError) as e:  # missing bucket, no credentials (an outage is reported as one)
            if is_outage(e):
                raise
            raise DataError(f"cannot read data source {src!r}: {e}") from e
        return Source("file", src, tuple(f"{protocol}://{f}" for f in files))
    path = Path(src.removeprefix("file://")).expanduser()
    if path.exists():
        fs = fsspec.filesystem("file")
        return Source("file", str(path.resolve()), tuple(_data_files(fs, str(path.resolve()))))
    if src.startswith((".", "/", "~")) or Path(src).suffix.lower() in BUILDERS:
        raise DataError(f"data source {src!r} does not exist")
    repo, _, split = src.partition("#")
    repo, _, config = repo.partition(":")
    return Source("hub", repo, (), config or None, split or "train")


def _data_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    if not fs.exists(root):
        raise DataError(f"data source {root!r} does not exist")
    if fs.isdir(root):
        files = sorted(f for f in fs.find(root) if Path(f).suffix.lower() in BUILDERS)
        if not files:
            raise DataError(f"data source {root!r} holds no CSV, JSON or Parquet files")
    else:
        files = [root]
        if Path(root).suffix.lower() not in BUILDERS:
            raise DataError(f"data source {root!r}: unsupported file type (use CSV, JSON/JSONL or Parquet)")
    builders = {BUILDERS[Path(f).suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DataError(f"data source {root!r} mixes file types {sorted(builders)}")
    return files


def fingerprint(source: Source, options: dict[str, Any] | None = None) -> str:
    """Content fingerprint: file bytes (local), ETag (S3 and other object stores), or hub revision sha."""
    if source.kind == "hub":
        return digest("hub", source.uri, source.config, source.split, _hub_revision(source.uri))
    files = []
    for f in source.files:
        fs, path = fsspec.core.url_to_fs(f, **(options or {}))
        try:
            files.append((os.path.basename(path), file_fingerprint(fs, path, f)))
        except OSError as e:
            if is_outage(e):
                raise
            raise DataError(f"cannot read {f}: {e}") from e
    return digest("files", files)


def _hub_revision(repo: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError

    try:
        return HfApi().dataset_info(repo).sha or "unknown"
    except HFValidationError as e:
        raise DataError(f"data source {repo!r} is neither a local path nor a valid hub dataset id") from e
    except Exception as e:  # offline, unknown repo, gated, ...
        raise DataError(f"cannot reach hub dataset {repo!r}: {e}") from e


def load(source: Source, options: dict[str, Any] | None = None, cache_dir: str | None = None):
    """Load `source` as one `datasets.Dataset` (remote files are fetched to a temporary directory)."""
    import datasets

    if source.kind == "hub":
        try:
            return datasets.load_dataset(source.uri, source.config, split=source.split, cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"cannot load hub dataset {source.uri!r} (split {source.split!r}): {e}") from e
    builder = BUILDERS[Path(source.files[0]).suffix.lower()]
    with tempfile.TemporaryDirectory(prefix="hfbatch-src-") as tmp:
        files: list[str] = []
        for f in source.files:
            if "://" in f:
                local = os.path.join(tmp, f"{len(files):05d}-{os.path.basename(f)}")
                fs, path = fsspec.core.url_to_fs(f, **(options or {}))
                try:
                    fs.get(path, local)
                except OSError as e:
                    if is_outage(e):
                        raise
                    raise DataError(f"cannot read {f}: {e}") from e
                files.append(local)
            else:
                files.append(f)
        if builder == "parquet" and sum(_parquet_rows(f, source) for f in files) == 0:
            raise DataError(f"data source {source.uri!r} is empty (0 rows)")
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"cannot read data source {source.uri!r} as {builder}: {e}") from e
        return ds


def _parquet_rows(path: str, source: Source) -> int:
    """Row count from the footer; fails early, naming the file, on a corrupt Parquet file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:
        raise DataError(f"corrupt or unreadable Parquet file {path!r} in {source.uri!r}: {e}") from e


def peek_columns(source: Source, options: dict[str, Any] | None = None) -> list[str] | None:
    """The column names of a file source without loading it (the first file's Parquet footer, CSV
    header or first JSON Lines record), for checks before any work; None where that is not cheap
    (a hub dataset, a JSON array). A corrupt first file is a `DataError` naming it."""
    import pyarrow.parquet as pq

    if source.kind != "file":
        return None
    first = source.files[0]
    builder = BUILDERS[Path(first).suffix.lower()]
    fs, path = fsspec.core.url_to_fs(first, **(options or {}))
    try:
        with fs.open(path, "rb") as f:
            if builder == "parquet":
                return pq.ParquetFile(f).schema_arrow.names
            line = f.readline().decode("utf-8", errors="replace").strip()
    except Exception as e:
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno is not None:
            raise  # the file system's own error (a network failure): not the file's fault
        raise DataError(f"corrupt or unreadable {builder} file {first!r}: {e}") from e
    if builder == "csv":
        import csv

        return next(csv.reader([line]), [])
    if line.startswith("{"):
        import json

        try:
            return list(json.loads(line))
        except json.JSONDecodeError:
            return None
    return None
