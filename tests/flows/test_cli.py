"""The CLI runs the flows in-process here (against the test Prefect server) and reports bad input
and bad hyperparameters as exit status 2 with a message naming the problem, before any training."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from hfbatch.flows.cli import main


def test_missing_label_column_fails_with_its_name(prefect_harness, minilm, tmp_path, capsys):
    data = tmp_path / "unlabelled.parquet"
    pq.write_table(pa.table({"text": ["good", "bad"], "stars": [5, 1]}), data)
    store = tmp_path / "store"
    code = main(["train", "--dataset", str(data), "--model", minilm, "--name", "m", "--store", str(store), "--json"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"hfbatch: error: data source {str(data)!r} has no column 'label' (--label-column)" in err
    assert not (store / "runs").exists() and not (store / "models").exists()


def test_invalid_hyperparameter_is_refused_before_any_work(prefect_harness, minilm, tmp_path, capsys):
    store = tmp_path / "store"
    code = main(["train", "--dataset", str(tmp_path / "never-read.parquet"), "--model", minilm, "--name", "m",
                 "--learning-rate", "5", "--store", str(store)])
    assert code == 2
    assert "--learning-rate: Input should be less than 1 (got 5.0)" in capsys.readouterr().err
    assert not store.exists()


def test_cli_progress_bar_and_human_summary(prefect_harness, tiny_models, conll, tmp_path, capsys, monkeypatch):
    from hfbatch.flows.cli import main

    monkeypatch.setenv("HFBATCH_PROGRESS", "1")  # stderr is no terminal here
    args = ["infer", "--model", tiny_models["token-classification"], "--task", "ner", "--input", str(conll),
            "--output", str(tmp_path / "out"), "--shard-rows", "50"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "120 rows → " in out and "120 predicted, 0 quarantined, 0/3 shards already done" in out
    bar = err.replace("\r", "\n").splitlines()
    assert any("hfbatch infer: 100%" in line and "120/120" in line and "shards 3/3" in line for line in bar)
    assert main(args) == 0  # a rerun: every shard already done
    out, err = capsys.readouterr()
    assert "3/3 shards already done" in out and "shards 3/3 (3 already done)" in err
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["shards_skipped"] == 3 and "hfbatch infer" not in err
    assert main([*args, "--columns", "text"]) == 2
    assert "INPUT=COLUMN" in capsys.readouterr().err


def test_infer_plans_once_and_hands_the_plan_to_the_flow(prefect_harness, tiny_models, conll, tmp_path, capsys,
                                                         monkeypatch):
    """The command line works out the run's plan before the flow run starts and hands it over as the flow's
    `plan` argument: each input file is fingerprinted once, and the flow run's recorded parameters name the
    plan's type (not its content, which is not sent to the API)."""
    from prefect.client.orchestration import get_client

    from hfbatch.tasks.batch import shards

    files = tmp_path / "in"
    files.mkdir()
    table = pq.read_table(conll)
    pq.write_table(table.slice(0, 60), files / "a.parquet")
    pq.write_table(table.slice(60), files / "b.parquet")
    hashed = []
    real = shards.file_fingerprint
    monkeypatch.setattr(shards, "file_fingerprint", lambda fs, path, url: hashed.append(url) or real(fs, path, url))
    assert main(["infer", "--model", tiny_models["token-classification"], "--task", "ner", "--input", str(files),
                 "--output", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == table.num_rows
    assert sorted(hashed) == sorted(str(p) for p in files.iterdir())
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(limit=1, sort="START_TIME_DESC")[0]
    assert run.parameters["plan"] == "<InferencePlan>" and run.parameters["input"] == str(files)
