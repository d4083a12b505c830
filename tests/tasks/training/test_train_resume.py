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


def test_killed_training_resumes_from_last_checkpoint(sst2_split, minilm, tmp_path):
    train, evald = sst2_split
    store = tmp_path / "store"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    # 1,280 rows in batches of 16: 80 steps, a checkpoint every 10
    args = ["--dataset", str(train), "--eval-dataset", str(evald), "--model", minilm, "--name", "resume",
            "--max-train-samples", "1280", "--batch-size", "16", "--max-length", "48", "--save-steps", "10",
            "--learning-rate", "1e-4", "--store", str(store), "--json"]

    proc = _train(args, env)
    deadline = time.time() + 600
    while len(_committed_steps(store)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    steps = _committed_steps(store)
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
