"""The train function alone: checkpoints committed at save_steps, none written just to be dropped."""
import json

import pytest

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.core.options import validated
from hfbatch.tasks.core.plots import loss_curve_png, loss_points
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.training.ingest import ingest
from hfbatch.tasks.training.tokenization import tokenize
from hfbatch.tasks.training.train import TrainConfig, train, training_precision

TC = get_recipe("text-classification")


def test_checkpoints_at_save_steps_only_and_rerun_reuses_the_model(sst2_split, minilm, tmp_path):
    store, settings, options = Store(str(tmp_path / "store")), Settings(), TC.options_class()
    model = resolve_model(minilm, settings)
    data = tokenize(ingest(str(sst2_split[1]), store, TC, options, settings), model, store, TC, options, settings, 32)
    config = TrainConfig(max_train_samples=80, batch_size=16, save_steps=2)  # 5 steps
    trained = train(data, model, store, TC, options, config, settings)
    assert (trained.global_step, trained.resumed_from_step, trained.train_samples) == (5, 0, 80)
    checkpoints = f"runs/{trained.run_key}/checkpoints"
    # saves at steps 2 and 4 (at most two kept); the Trainer's extra save after step 5 is skipped
    assert sorted(store.list(checkpoints)) == ["checkpoint-2", "checkpoint-4"]
    assert all(store.is_complete(f"{checkpoints}/{c}") for c in store.list(checkpoints))
    assert train(data, model, store, TC, options, config, settings) == trained  # committed: not trained again
    # the model's train_log.json (a 5-step run logs every step) renders as the dashboard's loss curve
    log_history = json.loads((store.local_dir(trained.key) / "train_log.json").read_text())
    assert [step for step, _ in loss_points(log_history)] == [1, 2, 3, 4, 5]
    png = loss_curve_png(log_history)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (480, 240)


def test_invalid_hyperparameters_are_named():
    with pytest.raises(ConfigError, match="--batch-size: Input should be greater than or equal to 1 \\(got 0\\)"):
        validated(TrainConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="--epochs: Input should be greater than 0"):
        validated(TrainConfig, {"epochs": 0})


def test_bf16_training_autocasts_where_the_cpu_has_bf16_units(sst2_split, minilm, tmp_path, monkeypatch):
    """`precision="bf16"`: the Trainer runs under bf16 autocast (a run of its own, the weights saved in fp32)
    on a CPU with bf16 units; a CPU without them is refused with a clear error before any work (simulated
    where this CPU has them: it cannot be swapped)."""
    import torch
    from safetensors import safe_open

    from hfbatch.tasks.engine import predictor as predictor_module

    store, settings, options = Store(str(tmp_path / "store")), Settings(), TC.options_class()
    model = resolve_model(minilm, settings)
    data = tokenize(ingest(str(sst2_split[1]), store, TC, options, settings), model, store, TC, options, settings, 32)
    config = TrainConfig(max_train_samples=32, batch_size=16, precision="bf16")
    if predictor_module.cpu_has_bf16():
        trained = train(data, model, store, TC, options, config, settings)
        exact = train(data, model, store, TC, options, config.model_copy(update={"precision": "auto"}), settings)
        assert (trained.precision, exact.precision) == ("bf16", "fp32") and trained.run_key != exact.run_key
        model_dir = store.local_dir(trained.key)
        assert json.loads((model_dir / "training_args.json").read_text())["bf16"] is True
        with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}  # noqa: SIM118
        monkeypatch.setattr(predictor_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="training precision 'bf16': this CPU has no bf16 units"):
        training_precision("cpu", "bf16")  # what the train flow checks before any work


def test_only_the_sampled_training_rows_are_tokenized(sst2_split, minilm, tmp_path):
    """`--max-train-samples N`: tokenization takes the seeded sample training draws (the same rows it drew
    from the whole tokenized set before), not every candidate row; without a sample, the key is unchanged."""
    store, settings, options = Store(str(tmp_path / "store")), Settings(), TC.options_class()
    model = resolve_model(minilm, settings)
    rows = ingest(str(sst2_split[1]), store, TC, options, settings)  # 800 rows
    sampled = tokenize(rows, model, store, TC, options, settings, 32, sample=(80, 42))
    whole = tokenize(rows, model, store, TC, options, settings, 32)
    assert (sampled.num_rows, whole.num_rows) == (80, rows.num_rows)
    expected = store.load_dataset(whole.key).shuffle(seed=42).select(range(80))
    assert store.load_dataset(sampled.key)["input_ids"] == expected["input_ids"]
    assert tokenize(rows, model, store, TC, options, settings, 32, sample=(10**9, 42)).key == whole.key
