"""F1 per class, or averaged ("macro", "micro", "weighted"); average=None gives the per-class list."""
import datasets
import evaluate
import numpy as np

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="class ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, average="macro", labels=None, **kwargs):
        p, r = np.asarray(predictions), np.asarray(references)
        labels = np.asarray(labels if labels is not None else np.union1d(p, r))
        tp = np.array([np.sum((p == c) & (r == c)) for c in labels], dtype=float)
        predicted = np.array([np.sum(p == c) for c in labels], dtype=float)
        actual = np.array([np.sum(r == c) for c in labels], dtype=float)
        if average == "micro":
            tp, predicted, actual = tp.sum(keepdims=True), predicted.sum(keepdims=True), actual.sum(keepdims=True)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                       where=(precision + recall) > 0)
        score = {"precision": precision, "recall": recall, "f1": f1}["f1"]
        if average is None:
            return {"f1": score.tolist()}
        if average == "weighted":
            return {"f1": float(np.average(score, weights=actual)) if actual.sum() else 0.0}
        return {"f1": float(score.mean())}
