"""Feature extraction in bulk: the pipeline's vectors, mean-pooled."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import resolve_model, run_local, texts_of


def test_feature_extraction_is_mean_pooled_pipeline(minilm, mixed, tmp_path):
    from transformers import pipeline

    manifest = run_local("feature-extraction", resolve_model(minilm), str(mixed), str(tmp_path / "out"),
                         shard_rows=120, batch_tokens=4096)
    result = pq.read_table(tmp_path / "out")
    assert result.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert manifest["rows_out"] == 230
    rows = list(range(0, 230, 9))  # a sample (the pipeline is slow per row), long reviews included
    texts = texts_of(mixed)
    pipe = pipeline("feature-extraction", model=minilm, tokenizer=minilm, truncation=True)
    expected = np.stack([np.mean(np.asarray(pipe(texts[i])[0]), axis=0) for i in rows])
    got = np.stack(result.column("embedding").to_numpy(zero_copy_only=False)[rows])
    np.testing.assert_allclose(got, expected, atol=1e-4)
