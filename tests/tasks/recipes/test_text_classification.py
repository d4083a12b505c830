"""Text classification in bulk: the pipeline's labels and scores, exactly once, and int8 with its close calls rescored."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.engine.first_token import FirstTokenLayer
from tests.helpers import call_flow, predictor, resolve_model, run_local, texts_of


def test_text_classification_matches_pipeline(prefect_harness, classifier, mixed, tmp_path):
    from transformers import pipeline

    from hfbatch.flows.inference import batch_inference

    out = tmp_path / "out"
    summary = call_flow(batch_inference, model=classifier, task="sentiment-analysis", input=str(mixed), output=str(out),
                              shard_rows=100, batch_tokens=2048)
    assert (summary["rows"], summary["rows_out"], summary["quarantined"], summary["shards"]) == (230, 230, 0, 3)
    result = pq.read_table(out)
    assert result.column_names == ["idx", "row_id", "label", "score", "model", "model_version"]
    assert result.column("idx").to_pylist() == list(range(230))  # input order, every row once
    assert result.column("row_id").to_pylist()[41] == "mixed.parquet:1:1"
    assert set(result.column("model_version").to_pylist()) == {summary["model_version"]}

    # the last layer ran for the first token only (what the head reads), and the outputs are the pipeline's
    used = predictor("text-classification", resolve_model(classifier))
    assert used.first_token_only and isinstance(used.model.bert.encoder.layer[-1], FirstTokenLayer)
    pipe = pipeline("text-classification", model=classifier, tokenizer=classifier, truncation=True)
    expected = pipe(texts_of(mixed))
    assert result.column("label").to_pylist() == [e["label"] for e in expected]
    np.testing.assert_allclose(result.column("score").to_numpy(), [e["score"] for e in expected], atol=1e-4)

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_in"] == 230 and len(manifest["parts"]) == 3
    assert manifest["model_version"] == summary["model_version"]

    # a rerun recomputes nothing: every shard skipped, parts untouched
    stats = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = call_flow(batch_inference, model=classifier, task="text-classification", input=str(mixed), output=str(out),
                            shard_rows=100)
    assert again["shards_skipped"] == again["shards"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stats

    # the same output with another model is refused, not mixed
    with pytest.raises(ConfigError, match="another configuration"):
        run_local("feature-extraction", resolve_model(classifier), str(mixed), str(out))


def test_int8_text_classification_scores_close_calls_again_in_fp32(classifier, mixed, tmp_path):
    """int8 text classification quantizes every encoder layer, and the rows whose two best int8 scores
    are close (where rounding may have changed the label) get the fp32 model's scores; the others keep
    int8's. The seeded head is sharpened (x40) so that scores spread across (0, 1) as a trained head's do."""
    import torch
    from transformers import AutoModelForSequenceClassification

    sharp = tmp_path / "sharp"
    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    model.save_pretrained(sharp)
    shutil.copy(Path(classifier) / "tokenizer.json", sharp)
    shutil.copy(Path(classifier) / "tokenizer_config.json", sharp)
    ref = resolve_model(str(sharp))
    exact = predictor("text-classification", ref)
    fast = predictor("text-classification", ref, "int8")
    linear = [type(m).__module__ for m in fast.model.bert.encoder.modules() if type(m).__name__ == "Linear"]
    assert len(linear) == 6 * 6 and all(".quantized" in m for m in linear)  # every encoder layer int8

    texts = texts_of(mixed)
    want, _ = exact.predict({"text": texts}, 2048)
    got, _ = fast.predict({"text": texts}, 2048)
    int8 = fast._outputs(fast.model, fast.preprocess({"text": texts}), 2048)
    close = fast.close_calls(int8)
    far = np.setdiff1d(np.arange(len(texts)), close)
    assert 10 < len(close) < len(texts) / 2, len(close)
    scores, labels = got.column("score").to_numpy(), np.array(got.column("label").to_pylist())
    exact_scores, exact_labels = want.column("score").to_numpy(), np.array(want.column("label").to_pylist())
    np.testing.assert_allclose(scores[close], exact_scores[close], atol=1e-6)
    assert (labels[close] == exact_labels[close]).all()
    int8_table = fast.postprocess(int8, None)
    np.testing.assert_array_equal(scores[far], int8_table.column("score").to_numpy()[far])
    assert not np.allclose(scores[far], exact_scores[far], atol=1e-4)  # int8 did run for these
    int8_labels = np.array(int8_table.column("label").to_pylist())
    assert (labels != exact_labels).sum() < (int8_labels != exact_labels).sum()  # 0 vs 15 here
    assert (labels == exact_labels).mean() >= 0.99


def test_training_data_checks_and_the_degenerate_model_gate():
    import datasets

    from hfbatch.tasks.core.errors import DataError
    from hfbatch.tasks.recipes import get_recipe

    recipe = get_recipe("text-classification")
    one = datasets.Dataset.from_dict({"label": [1] * 50})
    with pytest.raises(DataError, match=r"'d.parquet' has a single class \(\['pos'\]\)"):
        recipe.check_training_data(one, ("neg", "pos"), "d.parquet")
    skewed = datasets.Dataset.from_dict({"label": [0] * 995 + [1] * 5})
    assert recipe.check_training_data(skewed, ("neg", "pos"), "d") == [
        "class 'pos' has 5 of 1000 training rows (0.50%): predictions of it are unreliable"]
    assert recipe.check_training_data(datasets.Dataset.from_dict({"label": [0, 1] * 10}), ("neg", "pos"), "d") == []
    always_pos = {"confusion_matrix": {"labels": ["neg", "pos"], "matrix": [[0, 40], [0, 60]]}}
    assert recipe.gate_problem({}, always_pos) == "it predicts 'pos' for every eval row (a degenerate model)"
    assert recipe.gate_problem({}, {"confusion_matrix": {"labels": ["neg", "pos"], "matrix": [[30, 10], [5, 55]]}}) \
        is None
