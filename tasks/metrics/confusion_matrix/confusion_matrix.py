"""Confusion matrix: row = reference class, column = predicted class, in the order of `labels`."""
import datasets
import evaluate
import numpy as np

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="class ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, labels=None, **kwargs):
        p, r = np.asarray(predictions), np.asarray(references)
        labels = list(labels if labels is not None else np.union1d(p, r))
        index = {c: i for i, c in enumerate(labels)}
        matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for ref, pred in zip(r, p):
            if ref in index and pred in index:
                matrix[index[ref], index[pred]] += 1
        return {"confusion_matrix": matrix.tolist()}
