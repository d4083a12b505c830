"""Feature extraction: one mean-pooled embedding per row (bulk inference only)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hfbatch.tasks.engine.predictor import EncoderPredictor
from hfbatch.tasks.recipes.base import Recipe


class FeatureExtractionPredictor(EncoderPredictor):
    """`embedding`: the mean over tokens (padding excluded) of the last hidden state.

    `pipeline("feature-extraction")` returns one vector per token; the pooled vector here equals
    `np.mean(pipeline(text)[0], axis=0)` (and, for sentence-transformers checkpoints with mean
    pooling such as all-MiniLM-L6-v2, their embedding before normalisation).
    """

    def _load(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_ref.path, **self._load_kwargs())

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("embedding", pa.list_(pa.float32()))])

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("embedding", pa.list_(pa.float32(), self.model.config.hidden_size))])

    def _forward(self, model, batch: dict) -> np.ndarray:
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1)).cpu().numpy()

    def _empty_output(self) -> np.ndarray:
        return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)

    def _table(self, pooled: np.ndarray) -> pa.Table:
        values = pa.array(pooled.astype(np.float32, copy=False).ravel(), pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, self.model.config.hidden_size)
        return pa.table({"embedding": column}, schema=self.schema)


class FeatureExtraction(Recipe):
    task = "feature-extraction"
    predictor = FeatureExtractionPredictor
