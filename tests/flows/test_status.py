"""`hfbatch status` on a real registry (three versions of a tiny classifier), real `batch_inference` runs and
a deployment run, all in the test Prefect API."""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from hfbatch.flows.cli import main
from hfbatch.flows.status import collect_status, format_status
from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from tests.helpers import call_flow


@pytest.fixture(scope="module")
def tiny_classifier(minilm, tmp_path_factory) -> str:
    """A tiny random 2-label BERT (hidden size 32) with MiniLM's tokenizer: real, and fast to run."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-classifier")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                     label2id={"NEGATIVE": 0, "POSITIVE": 1})
    BertForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(out)
    return str(out)


def _register(store: Store, model_dir: str, run_key: str, accuracy: float):
    """Register `model_dir` as a trained run with the given eval accuracy (what the train flow records)."""
    key = f"runs/{run_key}/model"
    with store.staging(key) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    trained = TrainedModel(store=store.url, key=key, run_key=run_key, task="text-classification", base_model="tiny",
                           base_revision=None,
                           base_fingerprint="b" * 8, dataset_fingerprint="d" * 8, label_names=("neg", "pos"),
                           config={"epochs": 1}, device="cpu", precision="fp32", global_step=10,
                           resumed_from_step=0, train_samples=100, train_samples_per_second=1.0, train_loss=0.5)
    evaluation = EvalResult(store=store.url, key=f"evals/{run_key}", model=key, model_fingerprint="f",
                            dataset_fingerprint="E1", num_rows=800, label_names=("neg", "pos"),
                            metrics={"accuracy": accuracy, "f1": accuracy - 0.01})
    return Registry(store, "sst2").register(trained, evaluation)


def test_status_shows_champion_trend_and_last_runs(prefect_harness, tiny_classifier, data_dir, tmp_path, capsys):
    from prefect import get_client
    from prefect.states import Completed, Running

    from hfbatch.flows.inference import batch_inference

    store = Store(str(tmp_path / "store"))
    assert [_register(store, tiny_classifier, f"r{i}", acc).promoted
            for i, acc in enumerate([0.80, 0.78, 0.85], 1)] == [True, False, True]
    store.fs.makedirs(f"{store.root}/models/not a model")  # not a registry entry: ignored

    data = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 24), data)
    runs = []
    for _ in range(2):  # the second run into the same output skips every shard
        state = call_flow(batch_inference, model="sst2", task="text-classification", input=str(data),
                                output=str(tmp_path / "out"), store=store.url, shard_rows=10, return_state=True)
        runs.append((str(state.state_details.flow_run_id), state.result()))
    assert runs[0][1]["rows"] == 24 and runs[0][1]["model_version"] == "3"

    with get_client(sync_client=True) as client:  # a `train` run of a deployment, as a worker reports it
        deployment = client.create_deployment(flow_id=client.create_flow_from_name("train"), name="nightly")
        scheduled = client.create_flow_run_from_deployment(deployment)
        client.set_flow_run_state(scheduled.id, Running(), force=True)
        client.set_flow_run_state(scheduled.id, Completed(), force=True)

    status = collect_status(Settings(), store.url, limit=5)
    json.dumps(status)  # JSON-serialisable as it is
    assert status["store"] == store.url
    [model] = status["models"]
    assert model["name"] == "sst2"
    assert model["champion"]["version"] == "3" and model["champion"]["metrics"]["accuracy"] == 0.85
    assert [(v["version"], v["metrics"]["accuracy"], v["promoted"], v["champion"]) for v in model["versions"]] == [
        ("1", 0.80, True, False), ("2", 0.78, False, False), ("3", 0.85, True, True)]
    assert all(v["created"] for v in model["versions"])

    groups = {(g["flow"], g["deployment"]): g["runs"] for g in status["flows"]}
    inference = groups[("batch_inference", None)]
    got = {r["id"]: r for r in inference}
    for run_id, summary in runs:
        r = got[run_id]
        assert (r["state"], r["rows"], r["rows_per_s"], r["model"], r["model_version"]) == (
            "Completed", 24, summary["rows_per_s"], "sst2", "3")
        assert r["start_time"] and r["duration_s"] > 0
    assert runs[0][1]["rows_per_s"] > 0 and runs[1][1]["rows_per_s"] == 0.0  # the rerun computed nothing
    assert inference[0]["id"] == runs[1][0]  # newest first
    [train] = groups[("train", "nightly")]
    assert (train["id"], train["name"], train["state"]) == (str(scheduled.id), scheduled.name, "Completed")
    assert "rows" not in train
    # the deployment's run is not listed again among the runs outside any deployment (other tests of
    # this session's Prefect API may have some)
    assert str(scheduled.id) not in {r["id"] for r in groups.get(("train", None), [])}

    latest = collect_status(Settings(), store.url, limit=1)
    assert [r["id"] for g in latest["flows"] if g["flow"] == "batch_inference" for r in g["runs"]] == [runs[1][0]]

    text = format_status(status)
    assert "model sst2: champion v3 (accuracy 0.8500, f1 0.8400)" in text
    assert "+ v1" in text and "  v2" in text and "* v3" in text
    assert "flow train, deployment nightly" in text and "24 rows, " in text and "rows/s, sst2 3" in text

    # the CLI: --json prints the JSON document only; without it, the text
    capsys.readouterr()
    assert main(["status", "--json", "--store", store.url, "--limit", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == status["models"]
    assert [r["id"] for r in {(g["flow"], g["deployment"]): g["runs"] for g in out["flows"]}[
        ("batch_inference", None)]] == [runs[1][0], runs[0][0]]
    assert main(["status", "--store", store.url]) == 0
    assert "model sst2: champion v3" in capsys.readouterr().out


def test_status_without_a_prefect_api_reads_the_registry_alone(tiny_classifier, tmp_path):
    """Without `PREFECT_API_URL`, `hfbatch status` shows the registry and says that the run history needs a
    server: it starts none, and imports neither Prefect nor torch nor transformers (seconds each)."""
    import os
    import subprocess
    import sys

    store = Store(str(tmp_path / "store"))
    _register(store, tiny_classifier, "r1", 0.80)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    script = ("import sys; from hfbatch.flows.cli import main; code = main(sys.argv[1:]); "
              "print(sorted(m for m in ('prefect', 'torch', 'transformers') if m in sys.modules), code)")
    text = subprocess.run([sys.executable, "-c", script, "status", "--store", store.url], env=env,
                          capture_output=True, text=True, timeout=120)
    assert text.stdout.splitlines()[-1] == "[] 0", text.stderr[-3000:]
    assert "model sst2: champion v1" in text.stdout
    assert "run history: needs a Prefect server (set PREFECT_API_URL" in text.stdout
    as_json = subprocess.run([sys.executable, "-m", "hfbatch.flows.cli", "status", "--json", "--store", store.url],
                             env=env, capture_output=True, text=True, timeout=120)
    status = json.loads(as_json.stdout)
    assert status["flows"] is None and status["models"][0]["champion"]["version"] == "1"
    assert not (tmp_path / "prefect").exists()  # no server, no database
