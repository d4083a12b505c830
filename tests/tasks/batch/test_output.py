"""An output reflects exactly one input, model and configuration: write modes, changed input, an output
inside its input, leftovers of an interrupted overwrite, concurrent writers."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError
from tests.helpers import resolve_model, run_local


def _write(data_dir, path, start: int, n: int) -> list[int]:
    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(start, n).select(["idx", "text"])
    pq.write_table(table, path, row_group_size=5)
    return table.column("idx").to_pylist()


def _ids(out) -> list[int]:
    return sorted(pq.read_table(out).column("idx").to_pylist())


def test_changed_input_is_refused_in_resume_and_replaced_in_overwrite(classifier, data_dir, tmp_path):
    """The stale-rows case: the same file name with other rows, rerun into the same output."""
    src, out = tmp_path / "in" / "rows.parquet", tmp_path / "out"
    src.parent.mkdir()
    first = _write(data_dir, src, 0, 20)
    model = resolve_model(classifier)
    run_local("text-classification", model, str(src), str(out), shard_rows=5)
    assert _ids(out) == first
    second = _write(data_dir, src, 100, 15)  # rewritten under the same name
    with pytest.raises(ConfigError, match="the input's content changed since its results.*mode 'overwrite'"):
        run_local("text-classification", model, str(src), str(out), shard_rows=5)
    assert _ids(out) == first  # refused: nothing touched
    manifest = run_local("text-classification", model, str(src), str(out), shard_rows=5, mode="overwrite")
    assert _ids(out) == second and manifest["rows_out"] == 15 and len(manifest["parts"]) == 3
    assert len(list(out.glob("part-*.parquet"))) == 3 and len(list(out.glob("_markers/*.json"))) == 3
    again = run_local("text-classification", model, str(src), str(out), shard_rows=5)  # resume: all done
    assert again["shards_skipped"] == 3 and _ids(out) == second


def test_mode_error_and_foreign_outputs(classifier, data_dir, tmp_path):
    src = tmp_path / "rows.parquet"
    _write(data_dir, src, 0, 10)
    model = resolve_model(classifier)
    run_local("text-classification", model, str(src), str(tmp_path / "empty"), mode="error")  # empty: fine
    with pytest.raises(ConfigError, match="is not empty .*mode 'error'"):
        run_local("text-classification", model, str(src), str(tmp_path / "empty"), mode="error")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "report.csv").write_text("a,b\n")
    for mode in ("resume", "overwrite"):
        with pytest.raises(ConfigError, match="holds files hfbatch did not write"):
            run_local("text-classification", model, str(src), str(tmp_path / "theirs"), mode=mode)
    assert (tmp_path / "theirs" / "report.csv").read_text() == "a,b\n"
    with pytest.raises(ConfigError, match="mode must be one of"):
        run_local("text-classification", model, str(src), str(tmp_path / "x"), mode="append")


@pytest.mark.parametrize("output, where", [("in/out", "is inside the input"), ("in", "is the input"),
                                           (".", "holds the input")])
def test_an_output_inside_its_input_is_refused(classifier, data_dir, tmp_path, monkeypatch, output, where):
    (tmp_path / "in").mkdir()
    _write(data_dir, tmp_path / "in" / "rows.parquet", 0, 10)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=where):
        run_local("text-classification", resolve_model(classifier), "in", output)
    with pytest.raises(ConfigError, match="is inside the input"):
        run_local("text-classification", resolve_model(classifier), str(tmp_path / "in" / "*.parquet"),
                  str(tmp_path / "in" / "predictions"))
    assert not (tmp_path / "in" / "out").exists()


def test_leftovers_of_an_interrupted_overwrite_are_removed(classifier, data_dir, tmp_path):
    """An overwrite killed after it wrote its claim: the next run finishes it, and only its own parts,
    quarantine parts and markers remain."""
    src, out = tmp_path / "rows.parquet", tmp_path / "out"
    rows = _write(data_dir, src, 0, 10)
    model = resolve_model(classifier)
    run_local("text-classification", model, str(src), str(out), shard_rows=5)
    part = next(out.glob("part-*.parquet"))
    stale = out / "part-00007-0123456789abcdef.parquet"
    stale.write_bytes(part.read_bytes())
    (out / "_quarantine").mkdir()
    (out / "_quarantine" / stale.name).write_bytes(part.read_bytes())
    (out / "_markers" / "stale.json").write_text("{}")
    (out / "_manifest.json").unlink()
    manifest = run_local("text-classification", model, str(src), str(out), shard_rows=5)
    assert manifest["shards_skipped"] == 2 and _ids(out) == rows
    assert not stale.exists() and not (out / "_quarantine" / stale.name).exists()
    assert not (out / "_markers" / "stale.json").exists()


INFER = """
import sys
from tests.helpers import resolve_model, run_local
manifest = run_local("text-classification", resolve_model(sys.argv[1]), sys.argv[2], sys.argv[3], shard_rows=5)
print(manifest["shards"] - manifest["shards_skipped"], manifest["rows_out"])
"""


def test_two_runs_into_one_output_at_once_leave_each_row_once(classifier, data_dir, tmp_path):
    """Two processes write the same output at the same time: every part whole, each row once, and each
    shard computed by one of them only (the other waits for its claim: `tasks/batch/claims.py`)."""
    src, out = tmp_path / "rows.parquet", tmp_path / "out"
    rows = _write(data_dir, src, 0, 40)
    procs = [subprocess.Popen([sys.executable, "-c", INFER, classifier, str(src), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    computed, rows_out = zip(*(map(int, out.strip().splitlines()[-1].split()) for out, _ in results))
    assert rows_out == (40, 40) and sum(computed) == 8, computed  # 8 shards, each computed once
    assert not list((out / "_claims").glob("*.json"))  # every claim released
    assert pq.read_table(out).column("idx").to_pylist() == rows
    assert json.loads((out / "_manifest.json").read_text())["rows_out"] == 40
