"""Fill-mask in bulk: the pipeline's tokens; rows without a mask token quarantined."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hfbatch.tasks.predictors import get_predictor_class
from tests.helpers import resolve_model, run_local


def test_fill_mask_matches_pipeline_and_quarantines_rows_without_mask(tiny_models, data_dir, tmp_path):
    from transformers import pipeline

    words = [t.split() for t in pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 60)
             .column("text").to_pylist()]
    texts = [" ".join(w[: len(w) // 2] + ["[MASK]"] + w[len(w) // 2 + 1:]) for w in words]
    texts[5] = "no mask token here"
    path = tmp_path / "masked.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    model = tiny_models["fill-mask"]
    manifest = run_local("fill-mask", resolve_model(model), str(path), str(tmp_path / "out"),
                         on_bad_row="quarantine", options=get_predictor_class("fill-mask").options_class(top_k=3))
    assert (manifest["rows_out"], manifest["quarantined"]) == (59, 1)
    quarantine = pq.read_table(tmp_path / "out" / "_quarantine")
    assert quarantine.column("reason").to_pylist() == ["expected exactly one mask token [MASK], found 0"]
    assert quarantine.column("row_id").to_pylist() == ["masked.parquet:0:5"]
    got = pq.read_table(tmp_path / "out").column("predictions").to_pylist()
    pipe = pipeline("fill-mask", model=model, tokenizer=model, top_k=3)
    expected = pipe([t for i, t in enumerate(texts) if i != 5])
    for g, e in zip(got, expected, strict=True):
        assert [x["token_str"] for x in g] == [x["token_str"] for x in e]
        np.testing.assert_allclose([x["score"] for x in g], [x["score"] for x in e], atol=1e-4)

    # a shard with a single row (the pipeline unwraps a one-row list's result)
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": texts[:1]}), one)
    run_local("fill-mask", resolve_model(model), str(one), str(tmp_path / "one"),
              options=get_predictor_class("fill-mask").options_class(top_k=3))
    single = pq.read_table(tmp_path / "one").column("predictions").to_pylist()[0]
    assert [(x["token"], x["token_str"], x["sequence"]) for x in single] == \
           [(x["token"], x["token_str"], x["sequence"]) for x in pipe(texts[0])]


def test_top_k_defaults_to_five_and_zero_is_refused(tiny_models, data_dir, tmp_path):
    """`top_k` is shared with sampling (unset there means the model's generation config): unset, fill-mask
    returns 5 tokens per row; 0 is refused before any model is loaded."""
    import pytest

    from hfbatch.tasks.core.errors import ConfigError

    words = [t.split() for t in pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 6).column("text")
             .to_pylist()]
    path = tmp_path / "masked.parquet"
    pq.write_table(pa.table({"text": [" ".join(w[:1] + ["[MASK]"] + w[2:]) for w in words]}), path)
    model = resolve_model(tiny_models["fill-mask"])
    assert get_predictor_class("fill-mask").options_class().top_k == 5
    run_local("fill-mask", model, str(path), str(tmp_path / "out"))
    assert [len(p) for p in pq.read_table(tmp_path / "out").column("predictions").to_pylist()] == [5] * 6
    with pytest.raises(ConfigError, match="--top-k: Input should be greater than or equal to 1"):
        run_local("fill-mask", model, str(path), str(tmp_path / "zero"), top_k=0)
