"""A real `hfbatch train` process is SIGKILLed mid-training; the rerun resumes from its last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _train(args: list[str], env: dict) -> subprocess.Popen:
    # own session: the kill takes the CLI and the temporary Prefect server it started
    return subprocess.Popen([sys.executable, "-m", "hfbatch.flows.cli", "train", *args], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed_steps(store: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[-1]) for p in store.glob("runs/*/checkpoints/checkpoint-*/_SUCCESS"))


def _killed_after_two_checkpoints(args: list, env: dict, store: Path):
    """`hfbatch train args` SIGKILLed once two checkpoints are committed to `store`: the process, the steps
    committed, its stderr."""
    proc = _train(args, env)
    deadline = time.time() + 600
    while len(_committed_steps(store)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    return proc, _committed_steps(store), stderr


def test_killed_training_resumes_from_last_checkpoint(sst2_split, minilm, tmp_path):
    train, evald = sst2_split
    store = tmp_path / "store"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    # 1,280 rows in batches of 16: 80 steps, a checkpoint every 10
    args = ["--dataset", str(train), "--eval-dataset", str(evald), "--model", minilm, "--name", "resume",
            "--max-train-samples", "1280", "--batch-size", "16", "--max-length", "48", "--save-steps", "10",
            "--learning-rate", "1e-4", "--store", str(store), "--json"]

    proc, steps, stderr = _killed_after_two_checkpoints(args, env, store)
    assert steps and proc.returncode == -signal.SIGKILL, f"not killed mid-training: {steps} {stderr[-2000:]}"
    assert max(steps) < 80
    assert not list(store.glob("runs/*/model/_SUCCESS")) and not (store / "models").exists()

    proc = _train(args, env)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout)
    # the Trainer went on from the newest committed checkpoint: its step count did not restart
    assert result["resumed_from_step"] >= max(steps)
    assert result["global_step"] == 80
    assert (result["version"], result["promoted"]) == ("1", True)
    log = json.loads((store / "models" / "resume" / "1" / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, *range(4, 81, 4)]  # one history, no step twice


def _adapter(store: Path, name: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(store / "models" / name / "1" / "adapter" / "adapter_model.safetensors")


def test_a_killed_lora_fine_tune_resumes_and_registers_what_an_uninterrupted_one_does(data_dir, tmp_path):
    """SIGKILL during LoRA supervised fine-tuning of a tiny Llama-style model: the rerun goes on from the
    last committed checkpoint (adapter, optimizer, scheduler, step), and the adapter it registers is the
    one a run that was never interrupted registers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.generation_models import decoder_models

    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 480)
    texts = sst2.column("text").to_pylist()
    model = decoder_models(tmp_path / "models", texts + ["Positive or negative?"] * 20)["llama"]
    rows = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"prompt": [f"Positive or negative?\n{t}" for t in texts],
                             "completion": ["positive" if y else "negative" for y in sst2.column("label").to_pylist()]}),
                   rows)
    # 480 rows in batches of 8: 60 steps, a checkpoint every 6
    common = ["--task", "text-generation", "--dataset", str(rows), "--model", model, "--prompt-column", "prompt",
              "--completion-column", "completion", "--peft", "lora", "--lora-r", "4", "--batch-size", "8",
              "--max-length", "64", "--save-steps", "6", "--learning-rate", "1e-3", "--eval-fraction", "0.05",
              "--max-new-tokens", "2", "--json"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    args = [*common, "--name", "lora", "--store", str(killed)]
    proc, steps, stderr = _killed_after_two_checkpoints(args, env, killed)
    assert steps and max(steps) < 57 and proc.returncode == -signal.SIGKILL, f"{steps} {stderr[-2000:]}"
    [checkpoint] = list(killed.glob(f"runs/*/checkpoints/checkpoint-{max(steps)}"))
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= \
        {p.name for p in checkpoint.iterdir()}

    proc = _train(args, env)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    resumed = json.loads(stdout)
    assert resumed["resumed_from_step"] >= max(steps) and resumed["global_step"] == 57  # ceil(456 / 8)
    proc = _train([*common, "--name", "lora", "--store", str(whole)], env)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["resumed_from_step"] == 0
    a, b = _adapter(killed, "lora"), _adapter(whole, "lora")
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
