"""The CUDA path: mixed precision chosen from the hardware, training, evaluation and bulk inference on
the GPU. Skipped where there is no GPU (CI has none)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hfbatch.tasks.batch.runner import run_local
from hfbatch.tasks.core.models import pick_device, resolve_model, trained_model
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.training.evaluation import evaluate_model
from hfbatch.tasks.training.ingest import ingest
from hfbatch.tasks.training.tokenization import tokenize
from hfbatch.tasks.training.train import TrainConfig, train
from tests.helpers import predictor_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
EXPECTED = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
# the other tests keep hfbatch on the CPU (HFBATCH_DEVICE=cpu, conftest); these ask for CUDA
CUDA, CPU = Settings(device="cuda"), Settings(device="cpu")
TC = get_recipe("text-classification")


@pytest.fixture(scope="module")
def mixed_rows(data_dir) -> list[str]:
    """300 SST-2 phrases (not among the training rows) and 300 IMDb reviews, interleaved."""
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet").slice(60_800, 300).column("text").to_pylist()
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").slice(0, 300).column("text").to_pylist()
    return [t for pair in zip(sst2, imdb) for t in pair]


@pytest.fixture(scope="module")
def trained_on_cuda(sst2_split, minilm, tmp_path_factory):
    store, options = Store(str(tmp_path_factory.mktemp("store"))), TC.options_class()
    model = resolve_model(minilm, CUDA)
    train_data = ingest(str(sst2_split[0]), store, TC, options, CUDA)
    eval_data = ingest(str(sst2_split[1]), store, TC, options, CUDA, label_names=train_data.label_names)
    train_set = tokenize(train_data, model, store, TC, options, CUDA, 64)
    eval_set = tokenize(eval_data, model, store, TC, options, CUDA, 64, "eval")
    trained = train(train_set, model, store, TC, options, TrainConfig(max_train_samples=3000, learning_rate=1e-4),
                    CUDA)
    return trained_model(trained, store, CUDA), trained, eval_data, eval_set, store


def test_training_and_evaluation_run_on_cuda_in_mixed_precision(trained_on_cuda):
    model, trained, eval_data, eval_set, store = trained_on_cuda
    assert pick_device("cuda") == pick_device("auto") == ("cuda", EXPECTED)
    assert (trained.device, trained.precision, trained.global_step) == ("cuda", EXPECTED, 94)
    result = evaluate_model(model, eval_data, eval_set, store, TC, TC.options_class(), CUDA)
    assert result.metrics["accuracy"] >= 0.80


def test_bulk_inference_on_cuda_in_mixed_precision_keeps_the_fp32_pipeline_labels(trained_on_cuda, mixed_rows,
                                                                                 tmp_path):
    """hfbatch's exact mode on CUDA runs the model in bf16 (fp16 without bf16 units); its labels are
    those of the fp32 `pipeline` on the same GPU for at least 99 % of mixed short and long rows."""
    from transformers import pipeline

    ref, texts = trained_on_cuda[0], mixed_rows
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "rows.parquet")

    spec = predictor_spec("text-classification", ref, settings=CUDA)
    predictor = spec.load()
    assert (predictor.device, predictor.precision) == ("cuda", EXPECTED)
    assert next(predictor.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[EXPECTED]
    manifest = run_local(spec, str(tmp_path / "rows.parquet"), str(tmp_path / "out"), shard_rows=250)
    out = pq.read_table(tmp_path / "out").sort_by("id")
    assert manifest["rows_out"] == len(texts) and out.column("id").to_pylist() == list(range(len(texts)))

    pipe = pipeline("text-classification", model=ref.path, tokenizer=ref.path, device="cuda")
    assert next(pipe.model.parameters()).dtype == torch.float32
    expected = pipe(texts, batch_size=32, truncation=True)
    agree = np.mean([a == e["label"] for a, e in zip(out.column("label").to_pylist(), expected)])
    scores = np.abs(np.array(out.column("score").to_pylist()) - [e["score"] for e in expected])
    print(f"bf16 vs fp32 pipeline on {len(texts)} rows: labels {agree:.2%}, max score diff {scores.max():.4f}")
    assert agree >= 0.99
    assert np.median(scores) < 0.01


def test_embeddings_on_cuda_in_mixed_precision_stay_close_to_fp32(minilm, mixed_rows):
    """Feature extraction with the real MiniLM: bf16 on the GPU against the fp32 pipeline's mean-pooled
    vectors on the same GPU."""
    from transformers import pipeline

    ref = resolve_model(minilm, CUDA)
    predictor = predictor_spec("feature-extraction", ref, settings=CUDA).load()
    assert (predictor.device, predictor.precision) == ("cuda", EXPECTED)
    table, _ = predictor.predict({"text": mixed_rows}, predictor.batch_tokens)
    ours = np.array(table.column("embedding").to_pylist())
    pipe = pipeline("feature-extraction", model=ref.path, tokenizer=ref.path, device="cuda")
    theirs = np.array([np.mean(x[0], axis=0) for x in pipe(mixed_rows, truncation=True)])
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"bf16 vs fp32 embeddings on {len(mixed_rows)} rows: cosine min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() > 0.995


def test_device_setting_keeps_a_gpu_hosts_work_on_its_cpu(trained_on_cuda, mixed_rows):
    """Device `cpu` (HFBATCH_DEVICE=cpu) on a GPU host: fp32 on the CPU, scores as the CPU pipeline's."""
    from transformers import pipeline

    assert pick_device("cpu") == ("cpu", "fp32")
    ref, texts = trained_on_cuda[0], mixed_rows[:60]
    predictor = predictor_spec("text-classification", ref, settings=CPU).load()
    assert (predictor.device, next(predictor.model.parameters()).device.type) == ("cpu", "cpu")
    table, _ = predictor.predict({"text": texts}, predictor.batch_tokens)
    expected = pipeline("text-classification", model=ref.path, tokenizer=ref.path, device="cpu")(
        texts, batch_size=8, truncation=True)
    assert table.column("label").to_pylist() == [e["label"] for e in expected]
    np.testing.assert_allclose(table.column("score").to_pylist(), [e["score"] for e in expected], atol=1e-4)
