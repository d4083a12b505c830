"""Entity-level precision, recall and F1 (seqeval, IOB2 tags) overall and per entity type, and token accuracy."""
import datasets
import evaluate
from seqeval.metrics import accuracy_score
from seqeval.metrics import classification_report

_FEATURES = datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                               "references": datasets.Sequence(datasets.Value("string"))})


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="tag sequences",
                                   features=_FEATURES)

    def _compute(self, predictions, references, **kwargs):
        report = classification_report(references, predictions, output_dict=True, zero_division=0)
        overall = report.pop("micro avg")
        for average in ("macro avg", "weighted avg"):
            report.pop(average, None)
        per_type = {name: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                           "f1": float(v["f1-score"]), "number": int(v["support"])} for name, v in report.items()}
        return {**per_type, "overall_precision": float(overall["precision"]),
                "overall_recall": float(overall["recall"]), "overall_f1": float(overall["f1-score"]),
                "overall_accuracy": float(accuracy_score(references, predictions))}
