"""Text classification in bulk: `label` and `score` of the top class, as
`pipeline("text-classification")` returns them."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hfbatch.tasks.core.options import NoOptions
from hfbatch.tasks.engine.encoder import Encoded, EncoderPredictor

CLOSE_CALL_GAP = 0.2
"""int8: rows whose two best scores are closer than this are scored again in fp32."""


class TextClassificationPredictor(EncoderPredictor[NoOptions]):
    """Scores through softmax for single-label models, sigmoid for one label or multi-label ones, raw
    logits for regression, computed in numpy float32 exactly as the pipeline's postprocess, so that
    labels are the pipeline's and scores agree to float rounding."""

    task = "text-classification"
    aliases = ("sentiment-analysis",)
    heads = ("ForSequenceClassification",)
    auto_class = "AutoModelForSequenceClassification"
    first_token_head = True
    rescores_close_calls = True

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("label", pa.string()), ("score", pa.float32())])

    def _batch_outputs(self, model, batch: dict) -> np.ndarray:
        return model(**batch).logits.float().cpu().numpy()

    def close_calls(self, logits: np.ndarray) -> np.ndarray:
        """Rows whose two best scores are less than `CLOSE_CALL_GAP` apart: the rows whose label int8's
        rounding may have changed (how many, and how many labels that saves: `benchmarks/RESULTS.md`)."""
        if logits.shape[-1] < 2:
            return np.zeros(0, dtype=np.int64)
        top2 = np.sort(class_scores(logits, self.model.config), axis=-1)[:, -2:]
        return np.flatnonzero(top2[:, 1] - top2[:, 0] < CLOSE_CALL_GAP)

    def postprocess(self, outputs: np.ndarray, features: Encoded) -> pa.Table:
        return label_table(outputs, self.model.config)


def class_scores(logits: np.ndarray, config) -> np.ndarray:
    """Scores as the pipeline computes them, in numpy float32 as its postprocess does (so that scores match
    to the last bit): its default `function_to_apply` for this config (softmax, sigmoid or none)."""
    if config.problem_type == "regression":
        function = "none"
    elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
        function = "sigmoid"
    elif config.problem_type == "single_label_classification" or config.num_labels > 1:
        function = "softmax"
    else:
        function = getattr(config, "function_to_apply", None) or "none"
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return logits


def label_table(logits: np.ndarray, config) -> pa.Table:
    """`label` and `score` of the best class of each row of logits."""
    scores = class_scores(logits, config)
    labels = [config.id2label[int(i)] for i in scores.argmax(axis=-1)]
    return pa.table({"label": pa.array(labels, pa.string()),
                     "score": pa.array(scores.max(axis=-1) if len(scores) else [], pa.float32())})
