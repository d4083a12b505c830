"""SQuAD v1.1 exact match and F1 (0-100): answers normalised (lower case, no punctuation, articles or extra
spaces), each prediction scored against its best reference answer, as the official evaluation script does."""
import collections
import re
import string

import datasets
import evaluate

_FEATURES = datasets.Features({
    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
    "references": {"id": datasets.Value("string"),
                   "answers": datasets.Sequence({"text": datasets.Value("string"),
                                                 "answer_start": datasets.Value("int32")})},
})


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="answers by question id",
                                   features=_FEATURES)

    def _compute(self, predictions, references, **kwargs):
        answers = {p["id"]: p["prediction_text"] for p in predictions}
        exact = total_f1 = 0.0
        for ref in references:
            truths = ref["answers"]["text"]
            prediction = answers[ref["id"]]
            exact += max(float(normalize(prediction) == normalize(t)) for t in truths)
            total_f1 += max(f1(prediction, t) for t in truths)
        return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * total_f1 / len(references)}
