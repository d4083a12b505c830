"""Zero-shot classification in bulk: the pipeline's labels and scores."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.predictors import get_predictor_class
from tests.helpers import predictor, resolve_model, run_local, texts_of


def test_zero_shot_matches_pipeline(tiny_models, mixed, tmp_path):
    from transformers import pipeline

    model = tiny_models["zero-shot-classification"]
    labels = ("movies", "food", "sports")
    texts = texts_of(mixed)[:40]
    path = tmp_path / "zs.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    options = get_predictor_class("zero-shot-classification").options_class(candidate_labels=labels)
    run_local("zero-shot-classification", resolve_model(model), str(path), str(tmp_path / "out"), options=options)
    got = pq.read_table(tmp_path / "out")
    pipe = pipeline("zero-shot-classification", model=model, tokenizer=model)
    expected = pipe(texts, candidate_labels=list(labels))
    used = predictor("zero-shot-classification", resolve_model(model), candidate_labels=labels)
    assert used.first_token_only  # an NLI model reads the first token of each (premise, hypothesis) pair
    assert got.column("labels").to_pylist() == [e["labels"] for e in expected]
    assert got.column("label").to_pylist() == [e["labels"][0] for e in expected]
    np.testing.assert_allclose(np.array(got.column("scores").to_pylist()), [e["scores"] for e in expected],
                               atol=1e-4)
    with pytest.raises(ConfigError, match="--candidate-labels is required"):
        run_local("zero-shot-classification", resolve_model(model), str(path), str(tmp_path / "out2"))
