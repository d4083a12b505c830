"""Corpus chrF (0-100) computed by sacreBLEU with its default settings (character 6-grams, beta 2)."""
import datasets
import evaluate
import sacrebleu

_FEATURES = datasets.Features({"predictions": datasets.Value("string"),
                               "references": datasets.Sequence(datasets.Value("string"))})


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="texts, reference lists",
                                   features=_FEATURES)

    def _compute(self, predictions, references, **kwargs):
        streams = [[refs[i] if i < len(refs) else None for refs in references]
                   for i in range(max(len(r) for r in references))]
        return {"chrf": float(sacrebleu.corpus_chrf(predictions, streams).score)}
