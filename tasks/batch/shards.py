"""Input planning: list the Parquet files of an input URI and cut them into deterministic shards.

A shard is a contiguous row range of one file, aligned to row groups where they are small enough
(several whole row groups per shard) and cut inside a row group where it is larger than the target.
Shards are derived only from the files' content fingerprints and Parquet footers, so the same input
always gives the same shards, with the same keys, in the same order.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from hfbatch.tasks.core.errors import ConfigError, DataError, InputChangedError, TransientReadError, is_outage
from hfbatch.tasks.core.fingerprint import digest, file_fingerprint, file_version

PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input: its URL, its name relative to the input root, its fingerprint."""

    url: str
    name: str
    fingerprint: str
    num_rows: int
    row_groups: tuple[int, ...]
    """Rows per row group, from the footer."""
    version: str = field(default="", compare=False)
    """The file's version when it was fingerprinted (`file_version`): size, mtime and inode, or ETag."""
    schema: pa.Schema | None = field(default=None, compare=False, repr=False)
    """Its Arrow schema, from the same footer (what the run's spec checks, without reading it again)."""

    def arrow_schema(self, options: dict[str, Any] | None = None) -> pa.Schema:
        return self.schema if self.schema is not None else read_footer(self.url, options).schema.to_arrow_schema()


@dataclass(frozen=True)
class Shard:
    """Rows `[start, stop)` of `file` (file-level row numbers), lying in row groups `[rg_start, rg_stop)`."""

    index: int
    file: str
    name: str
    file_fingerprint: str
    rg_start: int
    rg_stop: int
    start: int
    stop: int
    file_version: str = field(default="", compare=False)
    """The version of `file` the plan fingerprinted: a shard reads that version or fails."""

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def fingerprint(self) -> str:
        """Content key of the shard's input rows: the file's content plus the row range."""
        return digest("shard", self.file_fingerprint, self.start, self.stop)


def open_fs(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of `url` and its path there (`options`: fsspec storage options)."""
    return fsspec.core.url_to_fs(url, **(options or {}))


def _protocol(url: str) -> str | None:
    return url.split("://", 1)[0] if "://" in url and not url.startswith("file://") else None


def list_input_files(uri: str, options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """`(url, name)` of every Parquet file of `uri` (a file, a directory, a glob or an `s3://` prefix),
    sorted by name; `name` is the path relative to the input root (the file name for a single file).
    Files and folders whose name starts with `_` or `.` (markers, temporary files) are skipped."""
    proto = _protocol(uri)
    if proto is None:
        uri = str(Path(uri.removeprefix("file://")).expanduser())
    fs, root = open_fs(uri, options)
    try:
        if any(c in root for c in "*?["):
            base = root[: min(root.find(c) for c in "*?[" if c in root)].rsplit("/", 1)[0]
            paths = fs.glob(root)
        elif fs.isdir(root):
            base, paths = root, fs.find(root)
        elif fs.exists(root):
            base, paths = root.rsplit("/", 1)[0], [root]
        else:
            raise DataError(f"input {uri!r} does not exist")
    except (OSError, PermissionError) as e:
        if is_outage(e):
            raise
        raise DataError(f"cannot list input {uri!r}: {e}") from e
    files = []
    for path in sorted(paths):
        name = path[len(base):].lstrip("/") if path.startswith(base) else path.rsplit("/", 1)[-1]
        if not path.lower().endswith(PARQUET_SUFFIXES) or any(p.startswith(("_", ".")) for p in name.split("/")):
            continue
        files.append((f"{proto}://{path}" if proto else path, name))
    if not files:
        raise DataError(f"input {uri!r} holds no Parquet files")
    return files


def read_footer(url: str, options: dict[str, Any] | None = None) -> pq.FileMetaData:
    """The Parquet footer of `url`; a corrupt or unreadable file is a `DataError` naming it."""
    fs, path = open_fs(url, options)
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata
    except (FileNotFoundError, PermissionError, pa.ArrowInvalid) as e:  # other OSErrors may pass: retried
        raise DataError(f"corrupt or unreadable Parquet file {url!r}: {e}") from e


def describe_input(uri: str, options: dict[str, Any] | None = None, corrupt: list[dict] | None = None
                   ) -> list[InputFile]:
    """Every Parquet file of `uri` with its fingerprint and row-group sizes (footers only).

    A corrupt or unreadable file raises `DataError` naming it; when a `corrupt` list is given, the
    file is instead recorded there as `{"file": name, "reason": ...}` and left out (quarantine mode).
    """
    out = []
    for url, name in list_input_files(uri, options):
        try:
            meta = read_footer(url, options)
        except DataError as e:
            if corrupt is None:
                raise
            corrupt.append({"file": name, "reason": str(e)})
            continue
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        fs, path = open_fs(url, options)
        version = file_version(fs, path, url)
        fingerprint = file_fingerprint(fs, path, url)
        check_version(url, version, file_version(fs, path, url))  # not rewritten while it was hashed
        out.append(InputFile(url, name, fingerprint, meta.num_rows, groups, version, meta.schema.to_arrow_schema()))
    if not out:
        raise DataError(f"input {uri!r} holds no readable Parquet file: {[c['reason'] for c in corrupt or []]}")
    return out


def plan_shards(files: list[InputFile], shard_rows: int) -> list[Shard]:
    """Cut `files` into shards of about `shard_rows` rows: consecutive whole row groups while they fit,
    a row group larger than `shard_rows` cut into equal row ranges. Deterministic in its inputs."""
    if shard_rows < 1:
        raise ConfigError(f"shard_rows must be >= 1, got {shard_rows}")
    shards: list[Shard] = []

    def add(f: InputFile, rg_start: int, rg_stop: int, start: int, stop: int) -> None:
        if stop > start:
            shards.append(Shard(len(shards), f.url, f.name, f.fingerprint, rg_start, rg_stop, start, stop, f.version))

    for f in files:
        offset, group_start, group_rg = 0, 0, 0
        for rg, n in enumerate(f.row_groups):
            if n > shard_rows:
                add(f, group_rg, rg, group_start, offset)
                pieces = -(-n // shard_rows)
                bounds = [offset + n * i // pieces for i in range(pieces + 1)]
                for a, b in itertools.pairwise(bounds):
                    add(f, rg, rg + 1, a, b)
                group_start, group_rg = offset + n, rg + 1
            elif offset + n - group_start > shard_rows:
                add(f, group_rg, rg, group_start, offset)
                group_start, group_rg = offset, rg
            offset += n
        add(f, group_rg, len(f.row_groups), group_start, offset)
    return shards


def check_version(url: str, planned: str, found: str) -> None:
    """Raise `InputChangedError` naming `url` if the file is no longer the version that was planned."""
    if planned and found != planned:
        raise InputChangedError(f"input file {url!r} changed after this run planned it (it was rewritten while "
                                "the run was under way): its results would mix two versions; nothing of it is "
                                "marked complete. Rerun once the input is stable (mode 'overwrite' replaces the "
                                "results of the old content)")


def input_fingerprint(files: list[InputFile]) -> str:
    return digest("input", [(f.name, f.fingerprint) for f in files])


@dataclass(frozen=True)
class CorruptRows:
    """The shard's rows of a row group whose data cannot be decoded."""

    num_rows: int
    reason: str


def iter_shard_batches(shard: Shard, columns: list[str], options: dict[str, Any] | None = None,
                       batch_rows: int = 4096, skip_corrupt: bool = False
                       ) -> Iterator[tuple[int, int, pa.RecordBatch | CorruptRows]]:
    """Stream the shard's rows as `(row_group, first row index within it, record batch)`, reading only
    `columns` and only the shard's row groups; never more than one record batch is materialised here.

    A row group whose data cannot be decoded raises `DataError` naming file and row group; with
    `skip_corrupt` it yields `(row_group, first row, CorruptRows)` for the shard's rows of it instead,
    after any batches of it read before the damage (the caller drops those).

    The file must be the version the plan fingerprinted, before the first batch and after the last
    (`InputChangedError` otherwise): a shard never yields rows of a file rewritten under the run."""
    fs, path = open_fs(shard.file, options)
    check_version(shard.file, shard.file_version, file_version(fs, path, shard.file))
    yield from _shard_batches(shard, fs, path, columns, options, batch_rows, skip_corrupt)
    check_version(shard.file, shard.file_version, file_version(fs, path, shard.file))


def _shard_batches(shard: Shard, fs: fsspec.AbstractFileSystem, path: str, columns: list[str],
                   options: dict[str, Any] | None, batch_rows: int, skip_corrupt: bool
                   ) -> Iterator[tuple[int, int, pa.RecordBatch | CorruptRows]]:
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(shard.rg_start))
        for rg in range(shard.rg_start, shard.rg_stop):
            rg_rows = pf.metadata.row_group(rg).num_rows
            lo, hi = max(shard.start - offset, 0), min(shard.stop - offset, rg_rows)
            pos = 0
            try:
                with _decoding(shard.file, rg, columns, options):
                    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=columns):
                        a, b = max(lo - pos, 0), min(hi - pos, batch.num_rows)
                        if b > a:
                            yield rg, pos + a, batch.slice(a, b - a)
                        pos += batch.num_rows
                        if pos >= hi:
                            break
            except DataError as e:
                if not skip_corrupt:
                    raise
                yield rg, lo, CorruptRows(hi - lo, str(e))
            offset += rg_rows


@contextmanager
def _decoding(url: str, row_group: int, columns: list[str], options: dict[str, Any] | None = None
              ) -> Iterator[None]:
    """Errors while decoding a row group name the file and row group. Invalid data is a `DataError`.
    Arrow raises a plain `OSError` for a damaged page, and also when a read stops short: the row group
    is read once more through a fresh handle, and only the same error again makes it a `DataError`;
    otherwise it is a `TransientReadError`, which the shard task retries. Errors the file system raises
    (their own types, or an errno) pass unchanged, and are retried where they are transient."""
    try:
        yield
    except pa.ArrowInvalid as e:
        raise DataError(f"corrupt Parquet data in {url!r}, row group {row_group}: {e}") from e
    except OSError as e:
        if not _arrow_io_error(e):  # raised by the file system (s3fs gives 5xx as OSError(EIO, ...))
            raise
        if _fails_again(url, row_group, columns, str(e), options):
            raise DataError(f"corrupt Parquet data in {url!r}, row group {row_group}: {e} "
                            "(the same error on a second read)") from e
        raise TransientReadError(f"reading {url!r}, row group {row_group}: {e}") from e


def _arrow_io_error(e: OSError) -> bool:
    """An error of Arrow's own (a plain OSError without errno), not one a file system raised."""
    return type(e) is OSError and e.errno is None


def _fails_again(url: str, row_group: int, columns: list[str], message: str,
                 options: dict[str, Any] | None = None) -> bool:
    """Whether reading the whole row group again fails with the same plain `OSError` (only on the error
    path: it holds the row group's columns in memory)."""
    fs, path = open_fs(url, options)
    try:
        with fs.open(path, "rb") as fh:
            pq.ParquetFile(fh).read_row_group(row_group, columns=columns)
    except OSError as e:
        return _arrow_io_error(e) and str(e) == message
    except Exception:
        return False
    return False

