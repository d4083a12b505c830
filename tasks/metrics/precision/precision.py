"""Precision per class, or averaged ("macro", "micro", "weighted"); average=None gives the per-class list."""
import datasets
import evaluate
from hfbatch.tasks.metrics.scores import classification_score

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="class ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, average="macro", labels=None, **kwargs):
        return {"precision": classification_score("precision", predictions, references, average, labels)}
