"""Run one shard exactly once, and check a finished run: the plain functions behind `batch_inference`.

Output layout (an fsspec directory URL)::

    part-<shard index>-<shard key>.parquet   predictions, one part per shard, rows in input order
    _quarantine/part-....parquet             rows that could not be predicted, with the reason
    _markers/<marker key>.json               completion marker of a shard (its manifest entry)
    _config.json                             task, columns and model the output belongs to
    _manifest.json                           parts, row counts, input fingerprint, model version
    _tmp/                                    parts being written (local outputs only)

Names starting with `_` are skipped by Parquet dataset readers, so `pq.read_table(output)` reads
exactly the predictions. A shard commits in this order: quarantine part, predictions part (each
written under a temporary name and renamed, or one atomic PUT on an object store), then its marker,
keyed by the shard's input fingerprint and the model version. A rerun skips every shard whose marker
and part exist; a shard killed before its marker is recomputed and overwrites the same part name,
so no row is ever duplicated or lost.
"""
from __future__ import annotations

import io
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import ConfigError, DataError, HfbatchError
from ..fingerprint import digest
from ..models import ModelRef
from ..store import Store
from .predictors import PRECISIONS, PREDICTORS, TaskOptions, canonical_task, get_predictor, input_names
from .shards import CorruptRows, InputFile, Shard, input_fingerprint, iter_shard_batches, read_footer

ID_COLUMNS = ("id", "idx")
ROW_ID = "row_id"
PROVENANCE = ("model", "model_version")
BAD_ROW_POLICIES = ("fail", "quarantine")
STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())


class IntegrityError(HfbatchError):
    """A finished run's output does not account for every input row exactly once."""


@dataclass(frozen=True)
class InferSpec:
    """Everything a shard needs to run: task, model, where its inputs come from, where results go."""

    task: str
    model: ModelRef
    output: str
    inputs: tuple[tuple[str, str], ...]
    """(logical input, input column) pairs, e.g. (("text", "sentence"),)."""
    keep_columns: tuple[str, ...] = ()
    batch_tokens: int | None = None
    """Token budget of one model batch; None: the predictor's default for its device."""
    on_bad_row: str = "fail"
    options: TaskOptions = field(default_factory=TaskOptions)

    @property
    def model_name(self) -> str:
        return self.model.name or self.model.source

    @property
    def model_version(self) -> str:
        return model_version(self.model)

    @property
    def config_key(self) -> str:
        """What the output depends on (not `batch_tokens`, which only changes speed)."""
        return digest("infer", self.task, self.inputs, self.keep_columns, self.on_bad_row, self.options,
                      self.model.fingerprint, self.model.tokenizer_fingerprint)

    def marker_key(self, shard: Shard) -> str:
        return digest("marker", shard.fingerprint, self.model_version, self.config_key)


def model_version(model: ModelRef) -> str:
    """Registry version, hub revision, or (for a plain directory) the weights' fingerprint."""
    return str(model.version or model.revision or f"sha256:{model.fingerprint[:16]}")


def output_for(output: str, model: ModelRef, day: str) -> str:
    """`output` with its `{date}` and `{model_version}` placeholders filled in: a scheduled run writes
    where its day and model say (an output holds one model version's results)."""
    try:
        return output.format(date=day, model_version=model_version(model))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"output {output!r}: only {{date}} and {{model_version}} can be filled in ({e})") from e


def build_spec(task: str, model: ModelRef, output: str, files: list[InputFile], text_column: str = "text",
               columns: dict[str, str] | None = None, keep_columns: list[str] | tuple[str, ...] | None = None,
               batch_tokens: int | None = None, on_bad_row: str = "fail", options: TaskOptions = TaskOptions()
               ) -> InferSpec:
    """Validate the parameters and every input file's schema, and return the shard spec.

    Raises `ConfigError` or `DataError` naming the problem; reads only Parquet footers, so a missing
    column or wrong type is reported before any model is loaded.
    """
    task = canonical_task(task)
    PREDICTORS[task].check_options(options)
    if options.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {options.precision!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ConfigError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
    names = input_names(task)
    mapping = {n: n for n in names}
    if "text" in names:
        mapping["text"] = text_column
    unknown = set(columns or {}) - set(names)
    if unknown:
        raise ConfigError(f"task {task} has inputs {list(names)}, not {sorted(unknown)}")
    mapping |= columns or {}
    output = output.rstrip("/")
    first = read_footer(files[0].url).schema.to_arrow_schema()
    if keep_columns is None:
        keep_columns = [c for c in ID_COLUMNS if c in first.names][:1]
    spec = InferSpec(task, model, output, tuple((n, mapping[n]) for n in names), tuple(keep_columns),
                     batch_tokens, on_bad_row, options)
    reserved = {ROW_ID, *PROVENANCE, *_prediction_columns(task)}
    clash = reserved & set(spec.keep_columns)
    if clash:
        raise ConfigError(f"keep_columns {sorted(clash)} clash with output columns {sorted(reserved)}")
    for f in files:
        schema = first if f is files[0] else read_footer(f.url).schema.to_arrow_schema()
        for name, column in spec.inputs:
            if column not in schema.names:
                raise DataError(f"input file {f.url!r} has no column {column!r} (input {name!r} of {task}); "
                                f"columns: {schema.names}")
            if schema.field(column).type not in STRING_TYPES:
                raise DataError(f"column {column!r} of {f.url!r} is {schema.field(column).type}, not a string")
        missing = [c for c in spec.keep_columns if c not in schema.names]
        if missing:
            raise DataError(f"input file {f.url!r} has no column(s) {missing} to keep; columns: {schema.names}")
    return spec


def _prediction_columns(task: str) -> tuple[str, ...]:
    return {"text-classification": ("label", "score"), "feature-extraction": ("embedding",),
            "question-answering": ("answer", "score", "start", "end"),
            "fill-mask": ("predictions",), "token-classification": ("entities",),
            "zero-shot-classification": ("label", "score", "labels", "scores")}[task]


def part_name(shard: Shard) -> str:
    return f"part-{shard.index:05d}-{shard.fingerprint[:16]}.parquet"


def prepare_output(spec: InferSpec) -> Store:
    """Claim `spec.output` for this configuration; refuse one that holds another model's results."""
    out = Store(spec.output)
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


def commit_bytes(out: Store, key: str, data: bytes) -> None:
    """Write `key` atomically: a local temporary file renamed into place, or one PUT on an object store."""
    if out.is_local:
        tmp_dir = os.path.join(out.root, "_tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, uuid.uuid4().hex)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.makedirs(os.path.dirname(os.path.join(out.root, key)), exist_ok=True)
        os.replace(tmp, os.path.join(out.root, key))
    else:
        out.fs.pipe_file(f"{out.root}/{key}", data)


def quarantine_files(spec: InferSpec, corrupt: list[dict]) -> None:
    """Record input files that could not be read at all (quarantine mode) in `_quarantine/_files.parquet`
    (rewritten whole by every run, so it always lists this run's corrupt files)."""
    if corrupt:
        table = pa.table({"file": [c["file"] for c in corrupt], "reason": [c["reason"] for c in corrupt]})
        commit_bytes(Store(spec.output), "_quarantine/_files.parquet", _parquet_bytes(table))


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def run_shard(shard: Shard, spec: InferSpec) -> dict:
    """Predict one shard and commit it (quarantine, part, marker), or return its marker if committed.

    Returns the shard's manifest entry: a small dict, never the predictions themselves.
    """
    out = Store(spec.output)
    marker = f"_markers/{spec.marker_key(shard)}.json"
    if out.exists(marker):
        entry = out.read_json(marker)
        if out.exists(entry["part"]):
            return entry | {"skipped": True}
    started = time.perf_counter()
    predictor = get_predictor(spec.task, spec.model, spec.options)
    good, bad = _read_shard(shard, spec, predictor)
    texts = {name: good.column(f"__in_{name}").to_pylist() for name, _ in spec.inputs}
    predictions, tokens = predictor.predict(texts, spec.batch_tokens or predictor.batch_tokens)
    n = good.num_rows
    result = good.select([*spec.keep_columns, ROW_ID])
    for column in predictions.column_names:
        result = result.append_column(predictions.schema.field(column), predictions.column(column))
    result = result.append_column("model", pa.array([spec.model_name] * n, pa.string()))
    result = result.append_column("model_version", pa.array([spec.model_version] * n, pa.string()))

    name = part_name(shard)
    quarantine = None
    if bad.num_rows:
        quarantine = f"_quarantine/{name}"
        commit_bytes(out, quarantine, _parquet_bytes(bad))
    commit_bytes(out, name, _parquet_bytes(result))
    entry = {"shard": shard.index, "file": shard.name, "start": shard.start, "stop": shard.stop,
             "fingerprint": shard.fingerprint, "model_version": spec.model_version, "part": name,
             "rows": n, "quarantine": quarantine, "quarantined": bad.num_rows, "tokens": tokens,
             "seconds": round(time.perf_counter() - started, 4)}
    out.write_json(marker, entry)
    return entry | {"skipped": False}


def _read_shard(shard: Shard, spec: InferSpec, predictor) -> tuple[pa.Table, pa.Table]:
    """Stream the shard's record batches; split rows into predictable ones and bad ones (with reasons),
    or raise `DataError` naming file, row group and row for the first bad row when `on_bad_row=fail`.
    In quarantine mode a row group that cannot be decoded sets all the shard's rows of it aside."""
    columns = list(dict.fromkeys([*spec.keep_columns, *(c for _, c in spec.inputs)]))
    good_parts, bad_parts = [], []  # (row group, table)
    quarantine = spec.on_bad_row == "quarantine"
    for rg, first, batch in iter_shard_batches(shard, columns, skip_corrupt=quarantine):
        if isinstance(batch, CorruptRows):  # drop what was read of it before the damage
            good_parts = [(g, t) for g, t in good_parts if g != rg]
            bad_parts = [(g, t) for g, t in bad_parts if g != rg]
            rows = list(range(first, first + batch.num_rows))
            bad_parts.append((rg, _bad_rows(shard, spec, rg, rows, [batch.reason] * len(rows))))
            continue
        values = {name: batch.column(col).to_pylist() for name, col in spec.inputs}
        reasons = []
        for i in range(batch.num_rows):
            row = {name: v[i] for name, v in values.items()}
            reason = _bad_value(row, spec) or predictor.problem(row)
            if reason and not quarantine:
                raise DataError(f"bad row in {shard.file!r}, row group {rg}, row {first + i} of that row group: "
                                f"{reason} (use on_bad_row='quarantine' to set such rows aside)")
            reasons.append(reason)
        table = pa.Table.from_batches([batch]).select(list(spec.keep_columns))
        table = table.append_column(ROW_ID, _row_ids(shard, rg, range(first, first + batch.num_rows)))
        ok = pa.array([r is None for r in reasons], pa.bool_())
        inputs = table
        for name, col in spec.inputs:
            inputs = inputs.append_column(f"__in_{name}", batch.column(col).cast(pa.string()))
        good_parts.append((rg, inputs.filter(ok)))
        if not pc.all(ok).as_py():
            bad_rows = [first + i for i, r in enumerate(reasons) if r is not None]
            bad_parts.append((rg, _bad_rows(shard, spec, rg, bad_rows, [r for r in reasons if r is not None],
                                            table.filter(pc.invert(ok)))))
    good = pa.concat_tables([t for _, t in good_parts]) if good_parts else _empty_inputs(shard, spec)
    bad = pa.concat_tables([t for _, t in bad_parts]) if bad_parts else pa.table({})
    return good, bad


def _row_ids(shard: Shard, rg: int, rows) -> pa.Array:
    return pa.array([f"{shard.name}:{rg}:{i}" for i in rows], pa.string())


def _bad_rows(shard: Shard, spec: InferSpec, rg: int, rows: list[int], reasons: list[str],
              kept: pa.Table | None = None) -> pa.Table:
    """Quarantine rows: the kept columns (null where the data could not be read), row id, file, row
    group, row and reason."""
    if kept is None:
        schema = read_footer(shard.file).schema.to_arrow_schema()
        kept = pa.table({**{c: pa.nulls(len(rows), schema.field(c).type) for c in spec.keep_columns},
                         ROW_ID: _row_ids(shard, rg, rows)})
    return (kept.append_column("file", pa.array([shard.name] * len(rows), pa.string()))
            .append_column("row_group", pa.array([rg] * len(rows), pa.int32()))
            .append_column("row", pa.array(rows, pa.int64()))
            .append_column("reason", pa.array(reasons, pa.string())))


def _bad_value(row: dict, spec: InferSpec) -> str | None:
    for name, column in spec.inputs:
        value = row[name]
        if value is None:
            return f"null {column!r}"
        if not isinstance(value, str):
            return f"non-string {column!r} ({type(value).__name__})"
        if not value.strip():
            return f"empty {column!r}"
    return None


def _empty_inputs(shard: Shard, spec: InferSpec) -> pa.Table:
    schema = read_footer(shard.file).schema.to_arrow_schema()
    fields = [schema.field(c) for c in spec.keep_columns] + [pa.field(ROW_ID, pa.string())]
    fields += [pa.field(f"__in_{name}", pa.string()) for name, _ in spec.inputs]
    return pa.schema(fields).empty_table()


def finalize(spec: InferSpec, files: list[InputFile], shards: list[Shard], entries: list[dict],
             seconds: float, corrupt: list[dict] | None = None) -> dict:
    """Check that output rows + quarantined rows == input rows (from the parts' own footers, shard by
    shard), write `_manifest.json`, remove temporary files, and return the manifest. Input files that
    could not be read at all (`corrupt`, quarantine mode) have no known row count: the manifest lists
    them under `corrupt_files`, and `_quarantine/_files.parquet` holds them with the reason."""
    out = Store(spec.output)
    problems = []
    for shard, entry in zip(shards, entries, strict=True):
        rows = _parquet_rows(out, entry["part"])
        quarantined = _parquet_rows(out, entry["quarantine"]) if entry["quarantine"] else 0
        if rows != entry["rows"] or quarantined != entry["quarantined"] or rows + quarantined != shard.num_rows:
            problems.append(f"shard {shard.index} ({shard.name} rows {shard.start}..{shard.stop}): "
                            f"{rows} predicted + {quarantined} quarantined != {shard.num_rows} input rows")
    if problems:
        raise IntegrityError(f"output {spec.output!r} does not account for every input row: " + "; ".join(problems))
    total = sum(s.num_rows for s in shards)
    manifest = {
        "task": spec.task, "model": spec.model_name, "model_source": spec.model.source,
        "model_version": spec.model_version, "model_fingerprint": spec.model.fingerprint,
        "input_fingerprint": input_fingerprint(files), "input_files": [f.name for f in files],
        "inputs": dict(spec.inputs), "keep_columns": list(spec.keep_columns), "on_bad_row": spec.on_bad_row,
        "rows_in": total, "rows_out": sum(e["rows"] for e in entries),
        "quarantined": sum(e["quarantined"] for e in entries), "shards": len(shards),
        "shards_skipped": sum(bool(e.get("skipped")) for e in entries),
        "tokens": sum(e["tokens"] for e in entries), "seconds": round(seconds, 3),
        "corrupt_files": list(corrupt or []),
        "parts": [{k: e[k] for k in ("shard", "file", "start", "stop", "fingerprint", "part", "rows",
                                     "quarantine", "quarantined")} for e in entries],
    }
    out.write_json("_manifest.json", manifest)
    if out.is_local:
        shutil.rmtree(os.path.join(out.root, "_tmp"), ignore_errors=True)
    return manifest


def _parquet_rows(out: Store, key: str) -> int:
    with out.fs.open(f"{out.root}/{key}", "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def run_local(task: str, model: ModelRef, input: str, output: str, shard_rows: int = 10_000, **spec_kwargs) -> dict:
    """The whole run without Prefect, shard after shard in this process (benchmarks, debugging)."""
    from .shards import describe_input, plan_shards

    started = time.perf_counter()
    corrupt = [] if spec_kwargs.get("on_bad_row") == "quarantine" else None
    files = describe_input(input, corrupt)
    spec = build_spec(task, model, output, files, **spec_kwargs)
    shards = plan_shards(files, shard_rows)
    prepare_output(spec)
    quarantine_files(spec, corrupt)
    entries = [run_shard(shard, spec) for shard in shards]
    return finalize(spec, files, shards, entries, time.perf_counter() - started, corrupt)
