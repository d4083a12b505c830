"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (0-1, rouge_score, no stemming), the mean over the
rows (rougeLsum splits summaries into sentences at newlines)."""
import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="texts",
                                   features=_FEATURES)

    def _compute(self, predictions, references, **kwargs):
        scorer = rouge_scorer.RougeScorer(list(TYPES), use_stemmer=False)
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        return {t: float(np.mean([s[t].fmeasure for s in scores])) if scores else 0.0 for t in TYPES}
