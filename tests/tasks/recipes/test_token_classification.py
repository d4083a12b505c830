"""Token classification in bulk: the pipeline's aggregated entities."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from tests.helpers import resolve_model, run_local, texts_of


def test_token_classification_matches_pipeline(tiny_models, conll, tmp_path):
    from transformers import pipeline

    model = tiny_models["token-classification"]
    run_local("ner", resolve_model(model), str(conll), str(tmp_path / "out"), shard_rows=50)
    got = pq.read_table(tmp_path / "out").column("entities").to_pylist()
    pipe = pipeline("token-classification", model=model, tokenizer=model, aggregation_strategy="simple")
    expected = pipe(texts_of(conll))
    assert len(got) == len(expected) == 120
    for g, e in zip(got, expected):
        assert [(x["entity_group"], x["word"], x["start"], x["end"]) for x in g] == \
               [(x["entity_group"], x["word"], x["start"], x["end"]) for x in e]
        np.testing.assert_allclose([x["score"] for x in g], [x["score"] for x in e], atol=1e-4)
