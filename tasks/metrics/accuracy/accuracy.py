"""Accuracy: the fraction of predictions equal to their references."""
import datasets
import evaluate
import numpy as np

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="class ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, **kwargs):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
