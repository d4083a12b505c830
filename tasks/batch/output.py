"""The output directory of a bulk-inference run: claimed for one configuration, written part by part,
checked and described by a manifest at the end.

Layout (an fsspec directory URL)::

    part-<shard index>-<shard key>.parquet   predictions, one part per shard, rows in input order
    _quarantine/part-....parquet             rows that could not be predicted, with the reason
    _quarantine/_files.parquet               input files that could not be read at all
    _markers/<marker key>.json               completion marker of a shard (its manifest entry)
    _claims/<marker key>.json                a shard some run is computing (`claims.py`)
    _config.json                             task, columns and model the output belongs to
    _manifest.json                           parts, row counts, input fingerprint, model version
    _staging/                                files being written (local outputs only)

Names starting with `_` are skipped by Parquet dataset readers, so `pq.read_table(output)` reads
exactly the predictions.
"""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hfbatch.tasks.batch.shards import InputFile, Shard, input_fingerprint
from hfbatch.tasks.batch.spec import InferSpec
from hfbatch.tasks.core.errors import ConfigError, IntegrityError
from hfbatch.tasks.core.monitoring import merge
from hfbatch.tasks.core.store import STAGING, Store


def output_store(spec: InferSpec) -> Store:
    return Store(spec.output, spec.storage_options(spec.output), spec.settings.cache_dir)


def part_name(shard: Shard) -> str:
    return f"part-{shard.index:05d}-{shard.fingerprint[:16]}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


MODES = ("resume", "overwrite", "error")
"""What a run does with an output that already holds something, as Spark's write modes and Ray Data's
`SaveMode` do: `resume` continues the same input, model and configuration and refuses anything else;
`overwrite` replaces whatever is there; `error` refuses any non-empty output."""
RESULTS = ("_manifest.json", "_markers", "_quarantine")


def prepare_output(spec: InferSpec, files: list[InputFile], mode: str = "resume", claim: bool = True) -> Store:
    """Claim `spec.output` for this input, model and configuration (`_config.json`), as `mode` says
    (`claim=False`: only check that it could, writing nothing).

    The output then holds exactly one input's results: a rerun on changed input content, or with
    another model or configuration, is refused in `resume` mode (naming what changed), and in
    `overwrite` mode the previous results are removed first, manifest first, so that an interrupted
    overwrite never looks complete.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    out = output_store(spec)
    ours = {"config_key": spec.config_key, "input_fingerprint": input_fingerprint(files), "task": spec.task,
            "model": spec.model_name, "model_version": spec.model_version, "inputs": dict(spec.inputs),
            "keep_columns": spec.keep_columns}
    found = [n for n in out.list("") if n != STAGING]
    if found and mode == "error":
        raise ConfigError(f"output {spec.output!r} is not empty ({', '.join(found[:5])}); mode 'error' writes "
                          "only into an empty output")
    if found and "_config.json" not in found:
        raise ConfigError(f"output {spec.output!r} holds files hfbatch did not write ({', '.join(found[:5])}); "
                          "choose another output")
    if not found and not claim:
        return out
    if not found and out.create_json("_config.json", ours):
        return out
    existing = out.read_json("_config.json")
    same = {k: existing.get(k) == ours[k] for k in ("config_key", "input_fingerprint")}
    if all(same.values()) and mode == "resume":
        return out
    if mode == "resume":
        what = ("the input's content changed since" if same["config_key"] else
                f"another configuration ({existing.get('task')}, {existing.get('model')} "
                f"{existing.get('model_version')}) wrote")
        raise ConfigError(f"output {spec.output!r}: {what} its results; rerun with mode 'overwrite' to replace "
                          "them, or choose another output")
    if not claim:
        return out
    out.remove("_manifest.json")  # first: from here on the output does not look complete
    out.write_json("_config.json", ours)
    for name in [*RESULTS[1:], *(n for n in found if n.startswith("part-"))]:
        out.remove(name)
    return out


def check_output_location(input_uri: str, output: str) -> None:
    """Refuse an output inside the input (its files would be read back as input rows), equal to it, or
    holding it."""
    def parts(uri: str) -> tuple[str, ...]:
        if "://" in uri and not uri.startswith("file://"):
            protocol, path = uri.split("://", 1)
            return (protocol, *[p for p in path.split("/") if p])
        return ("file", *Path(uri.removeprefix("file://")).expanduser().resolve().parts)

    root = input_uri[: min([input_uri.find(c) for c in "*?[" if c in input_uri] or [len(input_uri)])]
    source, target = parts(root.rstrip("/") or "/"), parts(output)
    shorter = min(len(source), len(target))
    if source[:shorter] == target[:shorter]:
        where = "is the input" if source == target else "is inside the input" if len(target) > len(source) \
            else "holds the input"
        raise ConfigError(f"output {output!r} {where} {input_uri!r}: choose an output outside the input")


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
    figures: dict[str, dict] = {}  # what it predicted (monitoring)
    for e in entries:
        figures = merge(figures, e.get("figures") or {})
    manifest = {
        "task": spec.task, "model": spec.model_name, "model_source": spec.model.source,
        "model_version": spec.model_version, "model_fingerprint": spec.model.fingerprint,
        "input_fingerprint": input_fingerprint(files), "input_files": [f.name for f in files],
        "inputs": dict(spec.inputs), "keep_columns": list(spec.keep_columns), "on_bad_row": spec.on_bad_row,
        "rows_in": sum(s.num_rows for s in shards), "rows_out": sum(e["rows"] for e in entries),
        "quarantined": sum(e["quarantined"] for e in entries), "shards": len(shards),
        "shards_skipped": sum(bool(e.get("skipped")) for e in entries),
        "tokens": sum(e["tokens"] for e in entries), "input_tokens": sum(e["tokens"] for e in entries),
        "output_tokens": sum(e.get("output_tokens", 0) for e in entries),
        "cut_at_limit": sum(e.get("cut_at_limit", 0) for e in entries), "seconds": round(seconds, 3),
        "rows_reused": sum(e.get("rows_reused", 0) for e in entries if not e.get("skipped")),
        "rows_computed": sum(e.get("rows_computed", e["rows"]) for e in entries if not e.get("skipped")),
        "seconds_saved": round(sum(e.get("seconds_saved", 0.0) for e in entries if not e.get("skipped")), 3),
        "corrupt_files": list(corrupt or []),
        "figures": figures,
        "parts": [{k: e[k] for k in ("shard", "file", "start", "stop", "fingerprint", "part", "rows",
                                     "quarantine", "quarantined")} for e in entries],
    }
    _remove_stale(out, entries, {f"{spec.marker_key(shard)}.json" for shard in shards})
    out.write_json("_manifest.json", manifest)
    out.clean_staging()
    return manifest


def _remove_stale(out: Store, entries: list[dict], markers: set[str]) -> None:
    """Remove parts, quarantine parts and markers that no shard of this run wrote (left by an
    interrupted overwrite), so that the output holds this run's rows only."""
    parts = {e["part"] for e in entries}
    for name in out.list(""):
        if name.startswith("part-") and name not in parts:
            out.remove(name)
    quarantined = {e["quarantine"].rsplit("/", 1)[-1] for e in entries if e["quarantine"]}
    for name in out.list("_quarantine"):
        if name.startswith("part-") and name not in quarantined:
            out.remove(f"_quarantine/{name}")
    for name in out.list("_markers"):
        if name not in markers:
            out.remove(f"_markers/{name}")


def _parquet_rows(out: Store, key: str) -> int:
    with out.fs.open(out.path(key), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows
