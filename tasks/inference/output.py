"""The output directory of a bulk-inference run: claimed for one configuration, written part by part,
checked and described by a manifest at the end.

Layout (an fsspec directory URL)::

    part-<shard index>-<shard key>.parquet   predictions, one part per shard, rows in input order
    _quarantine/part-....parquet             rows that could not be predicted, with the reason
    _quarantine/_files.parquet               input files that could not be read at all
    _markers/<marker key>.json               completion marker of a shard (its manifest entry)
    _config.json                             task, columns and model the output belongs to
    _manifest.json                           parts, row counts, input fingerprint, model version
    _staging/                                files being written (local outputs only)

Names starting with `_` are skipped by Parquet dataset readers, so `pq.read_table(output)` reads
exactly the predictions.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, IntegrityError
from ..store import STAGING, Store
from .shards import InputFile, Shard, input_fingerprint
from .spec import InferSpec


def output_store(spec: InferSpec) -> Store:
    return Store(spec.output, spec.storage_options(spec.output), spec.settings.cache_dir)


def part_name(shard: Shard) -> str:
    return f"part-{shard.index:05d}-{shard.fingerprint[:16]}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def prepare_output(spec: InferSpec) -> Store:
    """Claim `spec.output` for this configuration; refuse one that holds another model's results."""
    out = output_store(spec)
    config = {"config_key": spec.config_key, "task": spec.task, "model": spec.model_name,
              "model_version": spec.model_version, "inputs": dict(spec.inputs), "keep_columns": spec.keep_columns}
    if out.exists("_config.json"):
        existing = out.read_json("_config.json")
        if existing.get("config_key") != spec.config_key:
            raise ConfigError(f"output {spec.output!r} holds results of another configuration "
                              f"({existing.get('task')}, {existing.get('model')} {existing.get('model_version')}); "
                              "choose a new output or remove it")
    else:
        out.write_json("_config.json", config)
    return out


def quarantine_files(spec: InferSpec, corrupt: list[dict] | None) -> None:
    """Record input files that could not be read at all (quarantine mode) in `_quarantine/_files.parquet`
    (rewritten whole by every run, so it always lists this run's corrupt files)."""
    if corrupt:
        table = pa.table({"file": [c["file"] for c in corrupt], "reason": [c["reason"] for c in corrupt]})
        output_store(spec).write_bytes("_quarantine/_files.parquet", parquet_bytes(table))


def finalize(spec: InferSpec, files: list[InputFile], shards: list[Shard], entries: list[dict],
             seconds: float, corrupt: list[dict] | None = None) -> dict:
    """Check that output rows + quarantined rows == input rows (from the parts' own footers, shard by
    shard), write `_manifest.json`, remove temporary files, and return the manifest. Input files that
    could not be read at all (`corrupt`, quarantine mode) have no known row count: the manifest lists
    them under `corrupt_files`, and `_quarantine/_files.parquet` holds them with the reason."""
    out = output_store(spec)
    problems = []
    for shard, entry in zip(shards, entries, strict=True):
        rows = _parquet_rows(out, entry["part"])
        quarantined = _parquet_rows(out, entry["quarantine"]) if entry["quarantine"] else 0
        if rows != entry["rows"] or quarantined != entry["quarantined"] or rows + quarantined != shard.num_rows:
            problems.append(f"shard {shard.index} ({shard.name} rows {shard.start}..{shard.stop}): "
                            f"{rows} predicted + {quarantined} quarantined != {shard.num_rows} input rows")
    if problems:
        raise IntegrityError(f"output {spec.output!r} does not account for every input row: " + "; ".join(problems))
    manifest = {
        "task": spec.task, "model": spec.model_name, "model_source": spec.model.source,
        "model_version": spec.model_version, "model_fingerprint": spec.model.fingerprint,
        "input_fingerprint": input_fingerprint(files), "input_files": [f.name for f in files],
        "inputs": dict(spec.inputs), "keep_columns": list(spec.keep_columns), "on_bad_row": spec.on_bad_row,
        "rows_in": sum(s.num_rows for s in shards), "rows_out": sum(e["rows"] for e in entries),
        "quarantined": sum(e["quarantined"] for e in entries), "shards": len(shards),
        "shards_skipped": sum(bool(e.get("skipped")) for e in entries),
        "tokens": sum(e["tokens"] for e in entries), "seconds": round(seconds, 3),
        "corrupt_files": list(corrupt or []),
        "parts": [{k: e[k] for k in ("shard", "file", "start", "stop", "fingerprint", "part", "rows",
                                     "quarantine", "quarantined")} for e in entries],
    }
    out.write_json("_manifest.json", manifest)
    if out.is_local:
        out.remove(STAGING)
    return manifest


def _parquet_rows(out: Store, key: str) -> int:
    with out.fs.open(out.path(key), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows
