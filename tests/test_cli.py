"""The CLI runs the flows in-process here (against the test Prefect server) and reports bad input
and bad hyperparameters as exit status 2 with a message naming the problem, before any training."""
import pyarrow as pa
import pyarrow.parquet as pq

from flows.cli import main


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
    assert "learning_rate must be in (0, 1)" in capsys.readouterr().err
    assert not store.exists()
