"""Results reused across runs (issue 30, its first part): a run into a new output over re-partitioned,
partly edited and extended input copies the results an earlier run kept and computes only the other rows,
and writes what a run that computed everything writes (values, types, rows in input order), for a
classifier and for SmolLM2 text generation; a torn result segment is skipped, never copied."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import resolve_model, run_local

PREDICTIONS = ("label", "score", "generated_text", "input_tokens", "output_tokens", "finish_reason")


def _inputs(data_dir, root, n: int):
    """`first`: n SST-2 rows in one file; `second`: the same rows in two files in another order, 2 of them
    edited and 2 new ones added."""
    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(200, n + 2).select(["idx", "text"])
    first, second = root / "first", root / "second"
    first.mkdir()
    second.mkdir()
    pq.write_table(table.slice(0, n), first / "rows.parquet", row_group_size=4)
    texts = table.column("text").to_pylist()
    texts[1] = texts[1] + " (edited)"
    texts[5] = "an edited review that says nothing new "
    changed = pa.table({"idx": table.column("idx"), "text": texts})
    pq.write_table(changed.slice(n // 2), second / "a.parquet", row_group_size=3)  # with the 2 new rows
    pq.write_table(changed.slice(0, n // 2), second / "b.parquet", row_group_size=5)
    return first, second


def _predictions(path) -> pa.Table:
    table = pq.read_table(path).sort_by("row_id")
    return table.select([c for c in table.column_names if c in PREDICTIONS or c in ("idx", "row_id")])


@pytest.mark.parametrize("task", ["text-classification", "text-generation"])
def test_a_rerun_over_changed_input_computes_only_the_changed_rows(task, request, data_dir, tmp_path):
    model = resolve_model(request.getfixturevalue("classifier")) if task == "text-classification" else \
        request.getfixturevalue("smollm2")
    options = {} if task == "text-classification" else {
        "prompt_template": "Is this review positive or negative? Answer with one word.\nReview: {{ text }}",
        "max_new_tokens": 6}
    n = 12 if task == "text-classification" else 8
    first, second = _inputs(data_dir, tmp_path, n)
    store = str(tmp_path / "store")
    one = run_local(task, model, str(first), str(tmp_path / "one"), results=store, shard_rows=4, **options)
    assert (one["rows_reused"], one["rows_computed"]) == (0, n)
    two = run_local(task, model, str(second), str(tmp_path / "two"), results=store, shard_rows=4, **options)
    assert (two["rows_reused"], two["rows_computed"]) == (n - 2, 4)  # 2 edited, 2 new
    everything = run_local(task, model, str(second), str(tmp_path / "all"), shard_rows=4, **options)
    assert everything["rows_computed"] == n + 2
    reused, computed = _predictions(tmp_path / "two"), _predictions(tmp_path / "all")
    assert reused.schema == computed.schema
    assert reused.equals(computed)
    # each part keeps its input's row order
    for part in two["parts"]:
        ids = pq.read_table(tmp_path / "two" / part["part"]).column("row_id").to_pylist()
        assert [int(i.rsplit(":", 1)[1]) for i in ids] == sorted(int(i.rsplit(":", 1)[1]) for i in ids)

    # a torn segment is reported and skipped: its rows are computed again, never copied
    segments = sorted((tmp_path / "store" / "results").rglob("seg-*.parquet"))
    for segment in segments:
        segment.write_bytes(segment.read_bytes()[:40])
    again = run_local(task, model, str(second), str(tmp_path / "three"), results=store, shard_rows=4, **options)
    assert again["rows_reused"] == 0 and _predictions(tmp_path / "three").equals(computed)


def test_the_flow_reuses_results_into_a_new_output_and_says_so(prefect_harness, classifier, data_dir, tmp_path):
    """`batch_inference --reuse-results`: a second run into another output computes no row, its summary and
    manifest count the rows reused; without the option every row is computed."""
    import json

    from hfbatch.flows.inference import batch_inference
    from tests.helpers import call_flow

    first, _ = _inputs(data_dir, tmp_path, 12)
    common = dict(model=classifier, task="text-classification", input=str(first), store=str(tmp_path / "store"))
    one = call_flow(batch_inference, output=str(tmp_path / "one"), reuse_results=True, **common)
    two = call_flow(batch_inference, output=str(tmp_path / "two"), reuse_results=True, **common)
    assert (one["rows_reused"], one["rows_computed"], two["rows_reused"], two["rows_computed"]) == (0, 12, 12, 0)
    manifest = json.loads((tmp_path / "two" / "_manifest.json").read_text())
    assert (manifest["rows_reused"], manifest["rows_computed"]) == (12, 0)
    assert _predictions(tmp_path / "two").equals(_predictions(tmp_path / "one"))
    three = call_flow(batch_inference, output=str(tmp_path / "three"), **common)
    assert (three["rows_reused"], three["rows_computed"]) == (0, 12)
