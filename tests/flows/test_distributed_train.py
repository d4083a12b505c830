"""Training in several processes: the train flow with `nproc_per_node=2` fine-tunes under `torchrun` in
two real CPU processes (DDP over gloo) and registers the model; the flow itself refuses to run under
torchrun."""
import json

import pyarrow.parquet as pq
import pytest

from hfbatch.flows.training import train_flow
from hfbatch.tasks.core.errors import ConfigError
from tests.helpers import call_flow

pytestmark = pytest.mark.slow


def test_two_processes_train_and_register_one_model(prefect_harness, minilm, data_dir, tmp_path):
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet")
    pq.write_table(sst2.slice(0, 600), tmp_path / "train.parquet")
    pq.write_table(sst2.slice(60000, 100), tmp_path / "eval.parquet")
    store = tmp_path / "store"
    result = call_flow(train_flow, dataset=str(tmp_path / "train.parquet"), eval_dataset=str(tmp_path / "eval.parquet"),
                        model=minilm, name="ddp", max_train_samples=512, batch_size=16, learning_rate=3e-4,
                        max_length=32, save_steps=8, nproc_per_node=2, store=str(store))

    # each step took 16 rows in each of the 2 processes: 512 rows in 16 steps (one process: 32 steps)
    assert result["global_step"] == 16 and result["device"] == "cpu"
    assert (result["version"], result["promoted"], result["champion"]) == ("1", True, "1")
    version = store / "models" / "ddp" / "1"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "_SUCCESS"} <= {
        p.name for p in version.iterdir()}
    run = store / "runs" / result["run_key"]
    args = json.loads((run / "model" / "training_args.json").read_text())
    assert args["ddp_backend"] == "gloo" and args["per_device_train_batch_size"] == 16
    # the first process committed the checkpoints while training
    assert sorted(p.parent.name for p in (run / "checkpoints").glob("checkpoint-*/_SUCCESS")) == \
        ["checkpoint-16", "checkpoint-8"]


def test_the_flow_refuses_to_run_once_per_torchrun_process(prefect_harness, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="not under torchrun: --nproc-per-node N"):
        call_flow(train_flow, dataset=str(tmp_path / "never-read.parquet"), model=str(tmp_path / "m"), name="ddp")
