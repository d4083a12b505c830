"""Results reused across runs: each row's prediction kept in the store under a key of what its answer
depends on, so a run into any output, over any files, computes only the rows whose key it does not find
(as a content-addressed build cache does: the key is everything that can change the output, the value is
written once, a lookup that finds nothing costs little).

The key of a row: the predictor's (task, options, precision, device, model and tokenizer content) and the
row's input values, by input name (not its file, position or column name); and its row id where the
answer depends on it (seeded sampling). Under `results/<predictor key>/`:

    new/seg-*.parquet    what each shard computed: one segment, written whole after the output part
                         that holds its rows (a crash leaves a miss, never a wrong hit)
    pNN/*.parquet        the entries whose key's first byte is NN modulo 16, sorted by key, at most
                         `MERGE_AT` files per partition
    _predictor.json      what the key stands for (task, model, version) and when a run last used it

A run starts by compacting (`open_results`): the new segments are moved into their partitions (a
partition holding more than `MERGE_AT` files is merged into one), and the run's shards read only the
files of that snapshot, each shard only the partitions its keys fall in. A lookup holds the keys of one
shard in Python, never the store's: each partition file is read as Arrow and filtered by key there.
Every file is written once (atomically) and removed only by the compaction that copied its entries into
a new file, or by `prune`: a reader that finds a file gone computes those rows again. A file that cannot
be read (torn, truncated) is reported and skipped, never copied; compaction removes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.store import Store

log = logging.getLogger(__name__)

RESULTS_VERSION = 2
PARTITIONS = 16
MERGE_AT = 4
KEY = "__key"
KEY_TYPE = pa.binary(16)
SECONDS = "__seconds"
"""Each entry's compute time when it was computed (its shard's share per row): what reusing it saves."""
NEW = "new"
RECORD = "_predictor.json"
CACHE_BYTES = 256 * 2**20
"""Partition files a process keeps in memory, read once for all its shards (least recently used go)."""
_FILES: OrderedDict[tuple[str, str, int], pa.Table] = OrderedDict()
_FILES_LOCK = threading.Lock()


@dataclass(frozen=True)
class ResultSet:
    """Where a run's rows are looked up and added: the store, the predictor's key, and the files of the
    snapshot taken when the run started (path under `results/<key>/` and size)."""

    store: str
    key: str
    files: tuple[tuple[str, int], ...] = ()


def predictor_key(predictor) -> str:
    """What every answer of `predictor` (a `PredictorSpec`) depends on, besides the row."""
    from hfbatch.tasks.core.models import pick_device

    p = predictor
    return digest("results", RESULTS_VERSION, p.task, p.options.model_dump(), p.precision,
                  pick_device(p.settings.device), p.model.fingerprint, p.model.tokenizer_fingerprint)


def row_keys(values: dict[str, list], row_ids: list[str] | None = None) -> list[bytes]:
    """Each row's key (16 bytes) from its input values by name, and its row id where given: each part
    length-prefixed (a string as UTF-8, another value as JSON), so no two rows share an encoding."""
    names = sorted(values)
    columns = [values[n] for n in names] + ([row_ids] if row_ids is not None else [])
    head = json.dumps(names).encode()
    keys = []
    for row in zip(*columns):
        h = hashlib.blake2b(head, digest_size=16)
        for v in row:
            b = v.encode() if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True).encode() + b"j"
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        keys.append(h.digest())
    return keys


def _partitions(keys: pa.Array) -> np.ndarray:
    """Each key's partition (its first byte modulo `PARTITIONS`)."""
    raw = np.frombuffer(keys.buffers()[1], np.uint8, len(keys) * 16, keys.offset * 16)
    return raw[::16] % PARTITIONS


class Results:
    """The result entries of one predictor in a store (`schema`: its prediction columns)."""

    def __init__(self, store: Store, key: str, schema: pa.Schema):
        self.store, self.key, self.prefix, self.schema = store, key, f"results/{key}", schema
        self.entry_schema = pa.schema([pa.field(KEY, KEY_TYPE), pa.field(SECONDS, pa.float32()), *schema])

    def lookup(self, keys: list[bytes], files: tuple[tuple[str, int], ...]
               ) -> tuple[pa.Table, list[int | None], float]:
        """The entries found in `files` (a snapshot) for `keys`: a table of prediction columns, for each
        key its row in that table or None, and the compute seconds the rows found had cost."""
        wanted = pa.array(keys, KEY_TYPE)
        parts = {f"p{p:02d}" for p in np.unique(_partitions(wanted))} if keys else set()
        found = [t for f, size in files if f.split("/", 1)[0] in parts or f.startswith(NEW)
                 if (t := self._read(f, wanted, size)) is not None and t.num_rows]
        table = pa.concat_tables(found) if found else self.entry_schema.empty_table()
        where = pc.index_in(wanted, value_set=table.column(KEY).combine_chunks())
        saved = pc.sum(table.column(SECONDS).take(where.drop_null())).as_py() or 0.0
        return table.drop_columns([KEY, SECONDS]), where.to_pylist(), saved

    def _read(self, name: str, keys: pa.Array | None = None, size: int = -1) -> pa.Table | None:
        """The entries of file `name` (only those of `keys` when given), or None if it is gone or cannot
        be read (reported). A partition file of a known `size` is read once per process."""
        try:
            table = self._load(name) if name.startswith(NEW) or size < 0 else self._cached(name, size)
        except FileNotFoundError:  # compacted or pruned since the snapshot: its rows are computed again
            log.info("result file %s is gone (compacted or pruned), its rows are computed again",
                     self.store.uri(f"{self.prefix}/{name}"))
            return None
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:  # a torn or foreign file
            log.warning("result file %s cannot be read, skipped (%s: %s)", self.store.uri(f"{self.prefix}/{name}"),
                        type(e).__name__, e)
            return None
        return table if keys is None else table.filter(pc.is_in(table.column(KEY), value_set=keys))

    def _cached(self, name: str, size: int) -> pa.Table:
        """The entries of partition file `name` of `size` bytes, read once per process: a file is written
        once, with the same entries whoever writes it, so a copy in memory stays true (even after the file
        is removed); one of another size (damaged since) is read again."""
        key = (self.store.url, f"{self.prefix}/{name}", size)
        with _FILES_LOCK:
            if key in _FILES:
                _FILES.move_to_end(key)
                return _FILES[key]
        table = self._load(name)
        with _FILES_LOCK:
            _FILES[key] = table
            while len(_FILES) > 1 and sum(t.nbytes for t in _FILES.values()) > CACHE_BYTES:
                _FILES.popitem(last=False)
        return table

    def _load(self, name: str) -> pa.Table:
        with self.store.fs.open(self.store.path(f"{self.prefix}/{name}"), "rb") as f:
            table = pq.read_table(f)
        return table.select(self.entry_schema.names).cast(self.entry_schema)

    def append(self, keys: list[bytes], table: pa.Table, name: str, seconds: float) -> None:
        """Commit the entries of `keys` (rows of `table`, in order) as one new segment, written atomically;
        `name` says where they come from (the shard's fingerprint), `seconds` what computing them took."""
        if not keys:
            return
        entries = (table.select(self.schema.names).cast(self.schema)
                   .add_column(0, SECONDS, pa.array([seconds / len(keys)] * len(keys), pa.float32()))
                   .add_column(0, KEY, pa.array(keys, KEY_TYPE)))
        self.store.write_bytes(f"{self.prefix}/{NEW}/seg-{name[:16]}-{uuid.uuid4().hex[:8]}.parquet",
                               _parquet(entries))

    def compact(self, record: dict | None = None) -> tuple[tuple[str, int], ...]:
        """Move the new segments into their partitions, merge any partition holding more than `MERGE_AT`
        files, remove what was copied (and files that cannot be read), and return the snapshot: every
        file now holding entries. Safe beside other runs: a file is removed only after the file that holds
        its entries is committed, and a compaction that finds an input gone leaves that partition as is.
        `record` (what the key stands for) is written to `_predictor.json` with the time."""
        if record is not None:
            self.store.write_json(f"{self.prefix}/{RECORD}", record | {"used": time.time()})
        new = [f"{NEW}/{n}" for n in self.store.list(f"{self.prefix}/{NEW}") if n.endswith(".parquet")]
        tables, copied = [], []
        for name in new:
            try:
                tables.append(self._load(name))
                copied.append(name)
            except FileNotFoundError:  # another run's compaction took it
                continue
            except (pa.ArrowInvalid, KeyError, ValueError) as e:  # torn or foreign: reported, then removed
                log.warning("result file %s cannot be read, removed (%s: %s)", self.store.uri(f"{self.prefix}/{name}"),
                            type(e).__name__, e)
                copied.append(name)
        if tables:
            entries = pa.concat_tables(tables)
            parts = _partitions(entries.column(KEY).combine_chunks())
            committed = [self._add(int(p), entries.filter(pa.array(parts == p)), copied) for p in np.unique(parts)]
            if not all(committed):  # some entries are only in the new segments: they stay
                copied = []
        self._remove(copied)
        return tuple(snapshot for p in [*self._partition_names(), NEW] for snapshot in self._files(p))

    def _add(self, p: int, entries: pa.Table, sources: list[str]) -> bool:
        """Write `entries` as a new file of partition `p`, merged with its files when it holds more than
        `MERGE_AT`. False when a file to merge vanished under it (another run merged it): then nothing is
        committed here, and the new segments stay for the next compaction."""
        partition = f"p{p:02d}"
        olds = [f"{partition}/{n}" for n in self.store.list(f"{self.prefix}/{partition}") if n.endswith(".parquet")]
        merge = olds if len(olds) >= MERGE_AT else []
        tables = [entries]
        for name in merge:
            try:
                tables.append(self._load(name))
            except FileNotFoundError:
                return False
            except (pa.ArrowInvalid, KeyError, ValueError) as e:
                log.warning("result file %s cannot be read, removed (%s: %s)", self.store.uri(f"{self.prefix}/{name}"),
                            type(e).__name__, e)
        table = _unique(pa.concat_tables(tables))
        name = digest("results-file", sources, merge)[:20]
        self.store.write_bytes(f"{self.prefix}/{partition}/{name}.parquet", _parquet(table))
        self._remove(merge)
        return True

    def _files(self, folder: str) -> list[tuple[str, int]]:
        """(name, size) of the result files in `folder` of the prefix."""
        path = self.store.path(f"{self.prefix}/{folder}")
        if not self.store.fs.exists(path):
            return []
        return sorted((f"{folder}/{d['name'].rstrip('/').rsplit('/', 1)[-1]}", int(d["size"]))
                      for d in self.store.fs.ls(path, detail=True) if d["name"].endswith(".parquet"))

    def _partition_names(self) -> list[str]:
        return [f"p{p:02d}" for p in range(PARTITIONS)]

    def _remove(self, names: list[str]) -> None:
        for name in names:
            try:
                self.store.fs.rm_file(self.store.path(f"{self.prefix}/{name}"))
            except FileNotFoundError:  # removed by another run's compaction
                pass


def _unique(table: pa.Table) -> pa.Table:
    """`table` sorted by key, one entry per key."""
    table = table.sort_by(KEY)
    keys = table.column(KEY).combine_chunks()
    if len(keys) < 2:
        return table
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def combine(found: pa.Table, where: list[int | None], computed: pa.Table, schema: pa.Schema) -> pa.Table:
    """The predictions of every row in input order: found ones from `found` (by `where`), the others from
    `computed` (in order)."""
    indices: list[Any] = []
    n = found.num_rows
    next_computed = 0
    for w in where:
        if w is None:
            indices.append(n + next_computed)
            next_computed += 1
        else:
            indices.append(w)
    both = pa.concat_tables([found.cast(schema), computed.cast(schema)])
    return both.take(pa.array(indices, pa.int64()))


def prune(store: Store, unregistered: bool = False, older_than_s: float | None = None,
          max_bytes: int | None = None, dry_run: bool = False) -> dict:
    """Remove whole predictors' results from `store`: with `unregistered`, those of a registered model
    version no longer in its registry (and those whose record is missing); those no run has used for
    `older_than_s`; then the least recently used until the rest hold at most `max_bytes`. Safe while runs
    go on: a run that finds its files gone computes those rows again, and keeps what it computes; a run
    marks its predictor used when it starts, so what it reads is the last to go by age or size. Returns
    what was removed and what is kept."""
    from hfbatch.tasks.core.registry import Registry

    now = time.time()
    predictors = []
    for key in store.list("results"):
        prefix = f"results/{key}"
        record = store.read_json(f"{prefix}/{RECORD}") if store.exists(f"{prefix}/{RECORD}") else {}
        predictors.append({"key": key, **record, "used": record.get("used", 0.0),
                           "bytes": int(store.fs.du(store.path(prefix), total=True))})
    registered: dict[str, set[str]] = {}

    def stale(p: dict) -> str | None:
        if unregistered:
            if not p.get("registered"):
                return None if p.get("task") else "no record of its model"
            name, version = p["registered"]
            if name not in registered:
                index = Registry(store, name).load() if Registry.valid_name(name) else {"versions": []}
                registered[name] = {str(v["version"]) for v in index["versions"]}
            if str(version) not in registered[name]:
                return f"{name} v{version} is no longer registered"
        if older_than_s is not None and now - p["used"] > older_than_s:
            return f"unused for {(now - p['used']) / 86400:.1f} days"
        return None

    removed: list[dict] = []
    kept: list[dict] = []
    for p in sorted(predictors, key=lambda p: p["used"], reverse=True):  # most recently used first
        reason = stale(p)
        if reason:
            removed.append(p | {"reason": reason})
        else:
            kept.append(p)
    while max_bytes is not None and kept and sum(p["bytes"] for p in kept) > max_bytes:
        removed.append(kept.pop() | {"reason": f"the store's results are over {max_bytes} bytes"})
    if not dry_run:
        for p in removed:
            store.remove(f"results/{p['key']}")
    return {"removed": removed, "kept": kept, "bytes_removed": sum(p["bytes"] for p in removed),
            "bytes_kept": sum(p["bytes"] for p in kept), "dry_run": dry_run}
