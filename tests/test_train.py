"""The train function alone: checkpoints committed at save_steps, none written just to be dropped."""
import json

import pytest

from tasks.errors import ConfigError
from tasks.ingest import ingest
from tasks.models import resolve_model
from tasks.plots import loss_curve_png, loss_points
from tasks.store import Store
from tasks.tokenization import tokenize
from tasks.train import TrainConfig, train


def test_checkpoints_at_save_steps_only_and_rerun_reuses_the_model(sst2_split, minilm, tmp_path):
    store = Store(str(tmp_path / "store"))
    model = resolve_model(minilm)
    data = tokenize(ingest(str(sst2_split[1]), store), model, store, 32)
    config = TrainConfig(max_train_samples=80, batch_size=16, save_steps=2)  # 5 steps
    trained = train(data, model, store, config)
    assert (trained.global_step, trained.resumed_from_step, trained.train_samples) == (5, 0, 80)
    checkpoints = f"runs/{trained.run_key}/checkpoints"
    # saves at steps 2 and 4 (at most two kept); the Trainer's extra save after step 5 is skipped
    assert sorted(store.list(checkpoints)) == ["checkpoint-2", "checkpoint-4"]
    assert all(store.is_complete(f"{checkpoints}/{c}") for c in store.list(checkpoints))
    assert train(data, model, store, config) == trained  # committed: not trained again
    # the model's train_log.json (logged every 2 steps here) renders as the dashboard's loss curve
    log_history = json.loads((store.local_dir(trained.key) / "train_log.json").read_text())
    assert [step for step, _ in loss_points(log_history)] == [2, 4]
    png = loss_curve_png(log_history)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (480, 240)


def test_invalid_hyperparameters_are_named():
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        TrainConfig(epochs=0).validate()
