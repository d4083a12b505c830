"""Feature extraction in bulk: one mean-pooled embedding per row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hfbatch.tasks.core.options import NoOptions
from hfbatch.tasks.engine.encoder import Encoded, EncoderPredictor


class FeatureExtractionPredictor(EncoderPredictor[NoOptions]):
    """`embedding`: the mean over tokens (padding excluded) of the last hidden state.

    `pipeline("feature-extraction")` returns one vector per token; the pooled vector here equals
    `np.mean(pipeline(text)[0], axis=0)` (and, for sentence-transformers checkpoints with mean
    pooling such as all-MiniLM-L6-v2, their embedding before normalisation).
    """

    task = "feature-extraction"
    auto_class = "AutoModel"

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("embedding", pa.list_(pa.float32()))])

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("embedding", pa.list_(pa.float32(), self.model.config.hidden_size))])

    def _batch_outputs(self, model, batch: dict) -> np.ndarray:
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1)).cpu().numpy()

    def postprocess(self, outputs: np.ndarray, features: Encoded) -> pa.Table:
        values = pa.array(outputs.astype(np.float32, copy=False).ravel(), pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, self.model.config.hidden_size)
        return pa.table({"embedding": column}, schema=self.schema)
