"""Results reused across runs: each row's prediction kept in the store under a key of what its answer
depends on, so a run into any output, over any files, computes only the rows whose key it does not find
(as a content-addressed build cache does: the key is everything that can change the output, the value is
written once, a lookup that finds nothing costs little).

The key of a row: the predictor's (task, options, precision, model and tokenizer content) and the row's
input values, by input name (not its file, position or column name); and its row id where the answer
depends on it (seeded sampling). Entries live in append-only Parquet segments,
`results/<predictor key>/p<NN>/seg-<shard fingerprint>-<id>.parquet`, partitioned by the key's first byte:
a shard reads only the partitions its keys fall in, and filters each segment by its keys while reading.
A segment is written whole (one atomic write) after the output part that holds its rows is committed: a
crash leaves a miss, never a wrong hit; a segment that cannot be read is reported and skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.store import Store

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
PARTITIONS = 16
KEY = "__key"


def predictor_key(spec) -> str:
    """What every answer of this run's predictor depends on, besides the row (`spec`: an `InferSpec`)."""
    p = spec.predictor
    return digest("results", RESULTS_VERSION, p.task, p.options.model_dump(), p.precision, p.model.fingerprint,
                  p.model.tokenizer_fingerprint)


def row_keys(values: dict[str, list], row_ids: list[str] | None = None) -> list[bytes]:
    """Each row's key (16 bytes) from its input values by name, and its row id where given."""
    names = sorted(values)
    columns = [values[n] for n in names] + ([row_ids] if row_ids is not None else [])
    return [hashlib.blake2b(json.dumps([names, *row], default=str, ensure_ascii=False).encode(),
                            digest_size=16).digest() for row in zip(*columns)]


class Results:
    """The result entries of one predictor in a store."""

    def __init__(self, store: Store, key: str, schema: pa.Schema):
        self.store, self.prefix, self.schema = store, f"results/{key}", schema

    def _partition(self, key: bytes) -> str:
        return f"{self.prefix}/p{key[0] % PARTITIONS:02d}"

    def lookup(self, keys: list[bytes]) -> tuple[pa.Table, list[int | None]]:
        """The entries found for `keys` (a table of prediction columns) and, for each key, its row in that
        table or None."""
        wanted: dict[str, set[bytes]] = {}
        for k in keys:
            wanted.setdefault(self._partition(k), set()).add(k)
        found = []
        for partition, ks in wanted.items():
            for name in self.store.list(partition):
                if name.endswith(".parquet"):
                    table = self._read(f"{partition}/{name}", pa.array(list(ks), pa.binary(16)))
                    if table is not None and table.num_rows:
                        found.append(table)
        table = pa.concat_tables(found) if found else self.schema.insert(0, pa.field(KEY, pa.binary(16))).empty_table()
        where = {k: i for i, k in enumerate(table.column(KEY).to_pylist())}
        return table.drop_columns([KEY]), [where.get(k) for k in keys]

    def _read(self, key: str, keys: pa.Array) -> pa.Table | None:
        try:
            with self.store.fs.open(self.store.path(key), "rb") as f:
                table = pq.read_table(f, filters=pc.field(KEY).isin(keys))
            return table.select([KEY, *self.schema.names]).cast(self.schema.insert(0, pa.field(KEY, pa.binary(16))))
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:  # a torn or foreign segment
            log.warning("result segment %s cannot be read, skipped (%s: %s)", self.store.uri(key), type(e).__name__, e)
            return None

    def append(self, keys: list[bytes], table: pa.Table, name: str) -> None:
        """Commit the entries of `keys` (rows of `table`, in order), one segment per partition they fall in,
        each written atomically; `name` says where they come from (the shard's fingerprint)."""
        if not keys:
            return
        column = pa.array(keys, pa.binary(16))
        parts = pa.array([k[0] % PARTITIONS for k in keys], pa.int8())
        entries = table.select(self.schema.names).add_column(0, KEY, column)
        for p in sorted(set(parts.to_pylist())):
            chunk = entries.filter(pc.equal(parts, p))
            sink = pa.BufferOutputStream()
            pq.write_table(chunk, sink, compression="zstd")
            self.store.write_bytes(f"{self.prefix}/p{p:02d}/seg-{name[:16]}-{uuid.uuid4().hex[:8]}.parquet",
                                   sink.getvalue().to_pybytes())


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
