"""End to end: the train flow on real SST-2 rows and the real MiniLM checkpoint (CPU, ~2 minutes)."""
import json
import subprocess
import sys
import time

import pytest
from hfbatch.flows.training import train_flow

from tests.helpers import artifact_keys, task_states

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cold_run(prefect_harness, sst2_split, minilm, tmp_path_factory):
    train, evald = sst2_split
    store = str(tmp_path_factory.mktemp("store"))
    params = dict(dataset=str(train), eval_dataset=str(evald), model=minilm, name="sst2",
                  max_train_samples=3000, learning_rate=1e-4, max_length=64, save_steps=500, store=store)
    start = time.perf_counter()
    state = train_flow(**params, return_state=True)
    return params, state, time.perf_counter() - start


def test_cold_run_fine_tunes_beyond_chance_and_registers_champion(cold_run, tmp_path):
    params, state, _ = cold_run
    result = state.result()
    # 800 held-out SST-2 rows never seen in training; an untrained head scores about 0.5
    assert result["metrics"]["accuracy"] >= 0.80
    assert (result["version"], result["promoted"], result["champion"]) == ("1", True, "1")
    assert result["global_step"] == 94 and result["resumed_from_step"] == 0  # ceil(3000 / 32)

    from pathlib import Path

    version_dir = Path(params["store"]) / "models" / "sst2" / "1"
    names = {p.name for p in version_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "_SUCCESS"} <= names
    assert not any(n.endswith(".bin") for n in names)
    card = (version_dir / "README.md").read_text()
    assert params["model"] in card and "learning_rate | 0.0001" in card and "| accuracy |" in card
    evals = list((Path(params["store"]) / "evals").iterdir())
    matrix = json.loads((evals[0] / "confusion_matrix.json").read_text())
    assert matrix["labels"] == ["negative", "positive"] and sum(map(sum, matrix["matrix"])) == 800
    assert {"sst2-eval-metrics", "sst2-eval-per-class", "sst2-eval-confusion-matrix",
            "sst2-registration"} <= artifact_keys()
    assert set(task_states(state.state_details.flow_run_id)) == {"ingest", "tokenize", "train", "evaluate",
                                                                 "register"}


def test_unchanged_rerun_is_all_cache_hits(cold_run):
    params, cold_state, cold_seconds = cold_run
    start = time.perf_counter()
    state = train_flow(**params, return_state=True)
    warm_seconds = time.perf_counter() - start
    states = task_states(state.state_details.flow_run_id)
    assert all(set(v) == {"Cached"} for v in states.values()), states
    assert set(states) == {"ingest", "tokenize", "train", "evaluate", "register"}
    assert state.result() == cold_state.result()
    assert warm_seconds < cold_seconds / 5


def test_changed_hyperparameter_reuses_ingest_and_tokenize_and_gate_applies(cold_run):
    params, cold_state, _ = cold_run
    state = train_flow(**{**params, "max_train_samples": 64, "learning_rate": 1e-5}, return_state=True)
    states = task_states(state.state_details.flow_run_id)
    assert states["ingest"] == ["Cached", "Cached"] and states["tokenize"] == ["Cached", "Cached"]
    assert states["train"] == ["Completed"] and states["register"] == ["Completed"]
    result = state.result()
    # two steps at a tiny learning rate cannot beat the champion on the same eval set
    assert (result["version"], result["promoted"], result["champion"]) == ("2", False, "1")
    assert result["metrics"]["accuracy"] < cold_state.result()["metrics"]["accuracy"]


def test_cli_evaluate_resolves_champion_and_prints_json(cold_run, sst2_split):
    params, cold_state, _ = cold_run
    out = subprocess.run([sys.executable, "-m", "hfbatch.flows.cli", "evaluate", "--model", "sst2", "--dataset",
                          str(sst2_split[1]), "--store", params["store"], "--max-length", "64", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["version"] == "1" and result["num_rows"] == 800
    assert result["metrics"]["accuracy"] == pytest.approx(cold_state.result()["metrics"]["accuracy"])
    assert set(result["per_class"]["f1"]) == {"negative", "positive"}
