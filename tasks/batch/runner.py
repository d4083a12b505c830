"""Run one shard exactly once: the plain function behind each shard task of `batch_inference`.

A shard commits in this order: quarantine part, predictions part (each written atomically: a
temporary file renamed into place, or one PUT on an object store), then its marker, keyed by the
shard's input fingerprint, the model version and the configuration. A rerun skips every shard whose
marker and part exist; a shard killed before its marker is recomputed and overwrites the same part
name, so no row is ever duplicated or lost.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hfbatch.tasks.batch.claims import Claims
from hfbatch.tasks.batch.output import (
    check_output_location,
    finalize,
    output_store,
    parquet_bytes,
    part_name,
    prepare_output,
    quarantine_files,
)
from hfbatch.tasks.batch.results import Results, combine, row_keys
from hfbatch.tasks.batch.shards import CorruptRows, Shard, describe_input, iter_shard_batches, plan_shards, read_footer
from hfbatch.tasks.batch.spec import ROW_ID, InferSpec, build_spec
from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.core.inputs import Text
from hfbatch.tasks.core.monitoring import figures
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.engine.predictor import PredictorSpec

CLAIM_POLL_S = 1.0


def run_shard(shard: Shard, spec: InferSpec, wait: bool = True) -> dict | None:
    """Predict one shard and commit it (quarantine, part, marker), or return its marker if committed.

    A shard another live run has claimed (`claims`) is not computed twice: with `wait`, this waits for
    its marker (taking the shard over if that run dies); without, it returns None (try again later).
    Returns the shard's manifest entry: a small dict, never the predictions themselves.
    """
    out = output_store(spec)
    key = spec.marker_key(shard)
    claims = Claims(out)
    while (entry := _committed(out, key)) is None and not claims.acquire(key):
        if not wait:
            return None
        time.sleep(CLAIM_POLL_S)
    if entry is not None:
        return entry | {"skipped": True}
    with claims.holding(key):
        entry = _committed(out, key)  # finished by another run between the check and the claim
        return entry | {"skipped": True} if entry is not None else _compute(shard, spec, out, key)


def generated_counts(computed: pa.Table, predictions: pa.Table) -> dict:
    """What a generation task's predictions say of their length (whatever the task): `output_tokens`
    generated here (`computed`), and `cut_at_limit`, the rows of the output (`predictions`) whose answer
    stopped at the new-token limit (`finish_reason` `length`)."""
    counts = {}
    if "output_tokens" in computed.column_names:
        counts["output_tokens"] = int(pc.sum(computed.column("output_tokens")).as_py() or 0)
    if "finish_reason" in predictions.column_names:
        counts["cut_at_limit"] = int(pc.sum(pc.equal(predictions.column("finish_reason"), "length")).as_py() or 0)
    return counts


def _committed(out, key: str) -> dict | None:
    """The shard's manifest entry if its marker and part are committed."""
    marker = f"_markers/{key}.json"
    if out.exists(marker):
        entry = out.read_json(marker)
        if out.exists(entry["part"]):
            return entry
    return None


def _compute(shard: Shard, spec: InferSpec, out, key: str) -> dict:
    marker = f"_markers/{key}.json"
    started = time.perf_counter()
    predictor = spec.predictor.load()
    good, bad = _read_shard(shard, spec, predictor)
    values = {name: good.column(f"__in_{name}").to_pylist() for name, _ in spec.inputs}
    ids = good.column(ROW_ID).to_pylist() if predictor.uses_row_ids else None
    results = keys = None
    missing = list(range(good.num_rows))
    saved = 0.0
    if spec.results is not None:  # the rows whose results an earlier run kept are copied, not computed
        results = _results(spec, predictor.schema)
        keys = row_keys(values, ids if predictor.answers_depend_on_row_id else None)
        found, where, saved = results.lookup(keys, spec.results.files)
        missing = [i for i, w in enumerate(where) if w is None]
    computing = time.perf_counter()
    if len(missing) == good.num_rows:
        computed, tokens = predictor.predict(values, spec.batch_tokens, ids)
    else:
        computed, tokens = predictor.predict({k: [v[i] for i in missing] for k, v in values.items()},
                                             spec.batch_tokens, [ids[i] for i in missing] if ids is not None else None)
    compute_seconds = time.perf_counter() - computing
    predictions = computed if results is None else combine(found, where, computed, predictor.schema)
    spec.predictor.release()  # what the shard's batches freed: the next shard starts from the same RSS
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
        out.write_bytes(quarantine, parquet_bytes(bad))
    out.write_bytes(name, parquet_bytes(result))
    if results is not None and keys is not None:  # after the part that holds them: a crash leaves a miss
        results.append([keys[i] for i in missing], computed, shard.fingerprint, compute_seconds)
    entry = {"shard": shard.index, "file": shard.name, "start": shard.start, "stop": shard.stop,
             "fingerprint": shard.fingerprint, "model_version": spec.model_version, "part": name,
             "rows": n, "quarantine": quarantine, "quarantined": bad.num_rows, "tokens": tokens,
             "rows_reused": n - len(missing), "rows_computed": len(missing), "seconds_saved": round(saved, 3),
             **generated_counts(computed, predictions),
             "seconds": round(time.perf_counter() - started, 4),
             "figures": figures(predictions, {k: v for k, v in values.items() if isinstance(spec.kinds[k], Text)})}
    out.write_json(marker, entry)
    return entry | {"skipped": False}


def _results(spec: InferSpec, schema: pa.Schema) -> Results:
    assert spec.results is not None
    url = spec.results.store
    return Results(Store(url, spec.storage_options(url), spec.settings.cache_dir), spec.results.key, schema)


def open_results(spec: InferSpec) -> InferSpec:
    """The spec with the snapshot of its result entries its shards read, taken after compacting what
    earlier runs added (`Results.compact`); the spec as it is without reuse."""
    if spec.results is None:
        return spec
    model = spec.model
    record = {"task": spec.task, "model": spec.model_name, "model_version": spec.model_version,
              "registered": [model.name, model.version] if model.name and model.version else None}
    files = _results(spec, spec.predictor.output_schema()).compact(record)
    return replace(spec, results=replace(spec.results, files=files))


def _read_shard(shard: Shard, spec: InferSpec, predictor) -> tuple[pa.Table, pa.Table]:
    """Stream the shard's record batches; split rows into predictable ones and bad ones (with reasons),
    or raise `DataError` naming file, row group and row for the first bad row when `on_bad_row=fail`.
    In quarantine mode a row group that cannot be decoded sets all the shard's rows of it aside."""
    columns = list(dict.fromkeys([*spec.keep_columns, *(c for _, c in spec.inputs)]))
    kinds = spec.kinds
    good_parts: list[tuple[int, pa.Table]] = []  # (row group, table)
    bad_parts: list[tuple[int, pa.Table]] = []
    quarantine = spec.on_bad_row == "quarantine"
    for rg, first, batch in iter_shard_batches(shard, columns, spec.storage_options(shard.file),
                                               skip_corrupt=quarantine):
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
            reason = _bad_value(row, spec, kinds) or predictor.problem(row)
            if reason and not quarantine:
                raise DataError(f"bad row in {shard.file!r}, row group {rg}, row {first + i} of that row group: "
                                f"{reason} (use on_bad_row='quarantine' to set such rows aside)")
            reasons.append(reason)
        table = pa.Table.from_batches([batch]).select(list(spec.keep_columns))
        table = table.append_column(ROW_ID, _row_ids(shard, rg, range(first, first + batch.num_rows)))
        ok = pa.array([r is None for r in reasons], pa.bool_())
        inputs = table
        for name, col in spec.inputs:
            inputs = inputs.append_column(f"__in_{name}", kinds[name].values(batch.column(col)))
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
        schema = read_footer(shard.file, spec.storage_options(shard.file)).schema.to_arrow_schema()
        kept = pa.table({**{c: pa.nulls(len(rows), schema.field(c).type) for c in spec.keep_columns},
                         ROW_ID: _row_ids(shard, rg, rows)})
    return (kept.append_column("file", pa.array([shard.name] * len(rows), pa.string()))
            .append_column("row_group", pa.array([rg] * len(rows), pa.int32()))
            .append_column("row", pa.array(rows, pa.int64()))
            .append_column("reason", pa.array(reasons, pa.string())))


def _bad_value(row: dict, spec: InferSpec, kinds: dict) -> str | None:
    """Why a row's inputs cannot be predicted: a null, or a value its kind refuses (`core.inputs`)."""
    for name, column in spec.inputs:
        value = row[name]
        reason = f"null {column!r}" if value is None else kinds[name].problem(value, column)
        if reason:
            return reason
    return None


def _empty_inputs(shard: Shard, spec: InferSpec) -> pa.Table:
    schema = read_footer(shard.file, spec.storage_options(shard.file)).schema.to_arrow_schema()
    fields = [schema.field(c) for c in spec.keep_columns] + [pa.field(ROW_ID, pa.string())]
    kinds = spec.kinds
    fields += [pa.field(f"__in_{name}", kinds[name].values(pa.array([], schema.field(column).type)).type)
               for name, column in spec.inputs]
    return pa.schema(fields).empty_table()


def run_all(shards: list[Shard], submit: Callable[[Shard, bool], Any],
            result: Callable[[Shard, Any, bool], dict | None],
            done: Callable[[Shard, dict], None] | None = None) -> list[dict]:
    """The batch job's one loop, whatever runs the shards: each shard's entry, in shard order. First every
    shard is submitted without waiting for another run's claim (`submit(shard, False)`: a future, or
    anything `result` takes), and their results taken in order (`result(shard, future, False)`: the entry,
    or None for a shard another run is computing); then those are submitted again, waiting for them.
    `done(shard, entry)` is told of each entry as it comes (progress)."""
    entries: dict[int, dict] = {}
    pending = list(shards)
    for wait in (False, True):
        submitted = [(shard, submit(shard, wait)) for shard in pending]
        pending = []
        for shard, future in submitted:
            entry = result(shard, future, wait)
            if entry is None:
                pending.append(shard)
                continue
            entries[shard.index] = entry
            if done is not None:
                done(shard, entry)
    return [entries[s.index] for s in shards]


def run_local(predictor: PredictorSpec, input: str, output: str, shard_rows: int = 10_000, mode: str = "resume",
              **spec_kwargs) -> dict:
    """The whole run without Prefect, shard after shard in this process (benchmarks, debugging)."""
    started = time.perf_counter()
    check_output_location(input, output)
    settings = predictor.settings
    corrupt: list[dict] | None = [] if spec_kwargs.get("on_bad_row") == "quarantine" else None
    files = describe_input(input, settings.storage_options(input), corrupt)
    spec = build_spec(predictor, output, files, **spec_kwargs)
    shards = plan_shards(files, shard_rows)
    prepare_output(spec, files, mode)
    quarantine_files(spec, corrupt)
    spec = open_results(spec)
    # here a shard runs when its result is taken, one after another (the flow submits them to its runner)
    entries = run_all(shards, lambda shard, wait: None, lambda shard, _, wait: run_shard(shard, spec, wait))
    return finalize(spec, files, shards, entries, time.perf_counter() - started, corrupt)
