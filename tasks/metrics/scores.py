"""Precision, recall and F1 from class ids: the one computation behind the three metric modules."""
import numpy as np


def classification_score(name: str, predictions, references, average: str | None = "macro", labels=None):
    """`name` ("precision" | "recall" | "f1") per class when `average` is None (a list), else averaged
    ("macro", "micro" or "weighted" by support). Classes absent from both sides score 0, never NaN."""
    p, r = np.asarray(predictions), np.asarray(references)
    labels = np.asarray(labels if labels is not None else np.union1d(p, r))
    tp = np.array([np.sum((p == c) & (r == c)) for c in labels], dtype=float)
    predicted = np.array([np.sum(p == c) for c in labels], dtype=float)
    actual = np.array([np.sum(r == c) for c in labels], dtype=float)
    if average == "micro":
        tp, predicted, actual = tp.sum(keepdims=True), predicted.sum(keepdims=True), actual.sum(keepdims=True)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    score = {"precision": precision, "recall": recall, "f1": f1}[name]
    if average is None:
        return score.tolist()
    if average == "weighted":
        return float(np.average(score, weights=actual)) if actual.sum() else 0.0
    return float(score.mean())
