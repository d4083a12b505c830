"""The CUDA path: mixed precision chosen from the hardware, training and evaluation on the GPU.
Skipped where there is no GPU (CI has none)."""
import pytest
import torch

from tasks.evaluation import evaluate_model
from tasks.ingest import ingest
from tasks.metrics import AVAILABLE
from tasks.models import pick_device, resolve_model
from tasks.store import Store
from tasks.tokenization import tokenize
from tasks.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_training_and_evaluation_run_on_cuda_in_mixed_precision(sst2_split, minilm, tmp_path):
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert pick_device() == ("cuda", expected)
    store = Store(str(tmp_path / "store"))
    model = resolve_model(minilm)
    train_data = ingest(str(sst2_split[0]), store)
    eval_data = ingest(str(sst2_split[1]), store, label_names=train_data.label_names)
    train_set, eval_set = (tokenize(d, model, store, 64) for d in (train_data, eval_data))
    trained = train(train_set, model, store, TrainConfig(max_train_samples=3000, learning_rate=1e-4))
    assert (trained.device, trained.precision, trained.global_step) == ("cuda", expected, 94)
    result = evaluate_model(trained.model_ref(), eval_set, store, tuple(AVAILABLE))
    assert result.metrics["accuracy"] >= 0.80
