"""Results reused across runs (issue 30, its first part): a run into a new output over re-partitioned,
partly edited and extended input copies the results an earlier run kept and computes only the other rows,
and writes what a run that computed everything writes (values, types, rows in input order), for a
classifier and for SmolLM2 text generation; a torn result segment is skipped, never copied."""
from __future__ import annotations

import logging

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
def test_a_rerun_over_changed_input_computes_only_the_changed_rows(task, request, data_dir, tmp_path, caplog):
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

    # a torn file is reported and skipped: its rows are computed again, never copied; the compaction that
    # starts the next run removes a torn new segment
    files = sorted((tmp_path / "store" / "results").rglob("*.parquet"))
    assert any(f.parent.name == "new" for f in files) and any(f.parent.name.startswith("p") for f in files)
    for file in files:
        file.write_bytes(file.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="hfbatch.tasks.batch.results"):
        again = run_local(task, model, str(second), str(tmp_path / "three"), results=store, shard_rows=4, **options)
    assert again["rows_reused"] == 0 and _predictions(tmp_path / "three").equals(computed)
    torn = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(torn) >= len(files) and all("results/" in m for m in torn)
    assert not any(f.exists() for f in files if f.parent.name == "new")


def test_the_flow_reuses_results_into_a_new_output_and_says_so(prefect_harness, classifier, data_dir, tmp_path):
    """`batch_inference` (reuse on by default): a second run into another output computes no row, its summary
    and manifest count the rows reused and the compute time that saved; with `--no-reuse-results` every row
    is computed."""
    import json

    from hfbatch.flows.inference import batch_inference
    from tests.helpers import call_flow

    first, _ = _inputs(data_dir, tmp_path, 12)
    common = dict(model=classifier, task="text-classification", input=str(first), store=str(tmp_path / "store"))
    one = call_flow(batch_inference, output=str(tmp_path / "one"), **common)  # reuse is on by default
    two = call_flow(batch_inference, output=str(tmp_path / "two"), **common)
    assert (one["rows_reused"], one["rows_computed"], two["rows_reused"], two["rows_computed"]) == (0, 12, 12, 0)
    assert one["seconds_saved"] == 0 and two["seconds_saved"] > 0
    manifest = json.loads((tmp_path / "two" / "_manifest.json").read_text())
    assert (manifest["rows_reused"], manifest["rows_computed"], manifest["seconds_saved"]) == (12, 0, two["seconds_saved"])
    assert _predictions(tmp_path / "two").equals(_predictions(tmp_path / "one"))
    three = call_flow(batch_inference, output=str(tmp_path / "three"), reuse_results=False, **common)
    assert (three["rows_reused"], three["rows_computed"]) == (0, 12)


REUSE = """
import sys
from tests.helpers import resolve_model, run_local
manifest = run_local("text-classification", resolve_model(sys.argv[1]), sys.argv[2], sys.argv[3], shard_rows=5,
                     results=sys.argv[4])
print(manifest["rows_reused"], manifest["rows_computed"])
"""


def test_runs_adding_and_compacting_results_at_once_lose_nothing(classifier, data_dir, tmp_path):
    """Four processes over overlapping rows, into four outputs, with one result store, at once: each appends
    its segments and compacts the others' as it starts; afterwards every file of the store reads, and a run
    over all their rows computes none."""
    import subprocess
    import sys

    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(400, 60).select(["idx", "text"])
    inputs = []
    for i in range(4):
        path = tmp_path / f"in{i}.parquet"
        pq.write_table(table.slice(10 * i, 30), path, row_group_size=5)  # rows 10i .. 10i+29
        inputs.append(path)
    store = tmp_path / "store"
    # a first run leaves new segments, which the four runs all find and compact as they start
    run_local("text-classification", resolve_model(classifier), str(inputs[0]), str(tmp_path / "first"),
              results=str(store), shard_rows=5)
    procs = [subprocess.Popen([sys.executable, "-c", REUSE, classifier, str(inputs[i]), str(tmp_path / f"out{i}"),
                               str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    done = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in done]
    for file in (store / "results").rglob("*.parquet"):
        assert pq.read_table(file).num_rows > 0
    everything = tmp_path / "all.parquet"
    pq.write_table(table, everything)
    last = run_local("text-classification", resolve_model(classifier), str(everything), str(tmp_path / "last"),
                     results=str(store), shard_rows=5)
    assert (last["rows_reused"], last["rows_computed"]) == (60, 0)
    fresh = run_local("text-classification", resolve_model(classifier), str(everything), str(tmp_path / "fresh"),
                      shard_rows=5)
    assert fresh["rows_computed"] == 60
    assert _predictions(tmp_path / "last").equals(_predictions(tmp_path / "fresh"))


def test_prune_removes_results_by_registration_age_and_size(classifier, data_dir, tmp_path):
    """`hfbatch prune-results`: a dry run removes nothing; by size the least recently used predictor goes
    first; by age what no run used; `--unregistered` what has no record; a run after a prune computes
    again what was removed."""
    import json
    import os
    import time

    from hfbatch.flows.cli import main

    first, _ = _inputs(data_dir, tmp_path, 12)
    store = tmp_path / "store"
    model = resolve_model(classifier)
    run_local("text-classification", model, str(first), str(tmp_path / "a"), results=str(store), shard_rows=4)
    run_local("text-classification", model, str(first), str(tmp_path / "b"), results=str(store), shard_rows=4,
              precision="int8")  # another precision: another predictor
    keys = sorted((store / "results").iterdir(), key=lambda p: json.loads((p / "_predictor.json").read_text())["used"])
    older, newer = keys
    record = json.loads((older / "_predictor.json").read_text())
    assert record["task"] == "text-classification" and record["registered"] is None
    (older / "_predictor.json").write_text(json.dumps(record | {"used": time.time() - 3 * 86400}))

    def prune(*argv: str) -> dict:
        out = tmp_path / "prune.json"
        with open(out, "w") as f, __import__("contextlib").redirect_stdout(f):
            assert main(["prune-results", "--json", "--store", str(store), *argv]) == 0
        return json.loads(out.read_text())

    assert main(["prune-results", "--store", str(store)]) == 2  # nothing said to remove
    plan = prune("--older-than", "1", "--dry-run")
    assert [p["key"] for p in plan["removed"]] == [older.name] and older.exists()
    sizes = {p["key"]: p["bytes"] for p in plan["removed"] + plan["kept"]}
    assert all(size > 0 for size in sizes.values())
    done = prune("--max-size", str(sizes[newer.name]))  # room for the newer one only
    assert [p["key"] for p in done["removed"]] == [older.name] and not older.exists() and newer.exists()
    os.remove(newer / "_predictor.json")
    assert [p["key"] for p in prune("--unregistered")["removed"]] == [newer.name] and not newer.exists()
    again = run_local("text-classification", model, str(first), str(tmp_path / "c"), results=str(store),
                      shard_rows=4)
    assert again["rows_computed"] == 12
