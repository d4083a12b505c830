"""How sure a metric is: each eval row's statistics, bootstrap intervals, and the paired comparison of two models
on the same rows (the champion gate).

A metric's row statistics (`RowStats`: a `kind` and one list of numbers per eval row) are what the corpus figure
is built from, so that any resample of the rows gives its figure from the sums of its rows' statistics: a mean
of per-row scores (accuracy, exact match, SQuAD F1, ROUGE), a ratio of two sums (token accuracy), micro
precision/recall/F1 from entity counts (seqeval), macro precision/recall/F1 from per-class counts, or
sacreBLEU's sufficient statistics for BLEU and chrF (what its own paired bootstrap resamples). A resample is
drawn as counts per row (multinomial, as drawing the rows with replacement), the same draws for both models
of a comparison.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hfbatch.tasks.core.store import Store

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
KINDS = ("mean", "ratio", "entities", "classes", "bleu", "chrf")

ROWS_FILE = "rows.json"
"""In an evaluation's store directory: `{metric: RowStats}`."""

RowStats = dict
"""`{"kind": one of KINDS, "stats": [[float, ...], ...]}`: a metric's statistics, one list per eval row."""


def stored_rows(store: Store, eval_key: str) -> dict[str, RowStats]:
    """The row statistics the evaluation at `eval_key` kept (none for one made before they were kept)."""
    key = f"{eval_key}/{ROWS_FILE}"
    return store.read_json(key) if store.exists(key) else {}


def mean_stats(scores: Sequence[float]) -> RowStats:
    """A metric that is the mean of a per-row score."""
    return {"kind": "mean", "stats": [[float(s)] for s in scores]}


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float]) -> RowStats:
    """A metric that is sum(numerators) / sum(denominators) (e.g. correct tokens of all tokens)."""
    return {"kind": "ratio", "stats": [[float(a), float(b)] for a, b in zip(numerators, denominators)]}


def entity_stats(predicted: Sequence[set], gold: Sequence[set]) -> RowStats:
    """Micro precision/recall/F1 of the items (entities) each row predicts and should have."""
    return {"kind": "entities", "stats": [[len(p & g), len(p), len(g)] for p, g in zip(predicted, gold)]}


def class_stats(predicted: Sequence[int], references: Sequence[int], n_classes: int) -> RowStats:
    """Macro precision/recall/F1 over `n_classes` classes: per row, per class, true positive, predicted, actual."""
    p, r = np.asarray(predicted), np.asarray(references)
    classes = np.arange(n_classes)
    hit_p, hit_r = (p[:, None] == classes), (r[:, None] == classes)
    return {"kind": "classes", "stats": np.concatenate([hit_p & hit_r, hit_p, hit_r], axis=1).astype(float).tolist()}


def _sacrebleu(kind: str):
    import sacrebleu

    return sacrebleu.BLEU() if kind == "bleu" else sacrebleu.CHRF()


def sacrebleu_stats(kind: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> RowStats:
    """sacreBLEU's sufficient statistics of each row (`kind` bleu or chrf, default settings as the metric
    modules use; `references`: the references of each row)."""
    streams = [[refs[i] if i < len(refs) else None for refs in references]
               for i in range(max(len(r) for r in references))]
    stats = _sacrebleu(kind)._extract_corpus_statistics(list(predictions), streams)
    return {"kind": kind, "stats": [[float(x) for x in row] for row in stats]}


def scores(metric: str, row: RowStats, weights: np.ndarray) -> np.ndarray:
    """The figure of `metric` for each resample: `weights` (resamples, rows) counts how often each row is in
    each resample (a row of ones: the eval set itself)."""
    stats = np.asarray(row["stats"], dtype=np.float64)
    sums = weights @ stats
    kind = row["kind"]
    if kind == "mean":
        return sums[:, 0] / weights.sum(axis=1)
    if kind == "ratio":
        return np.divide(sums[:, 0], sums[:, 1], out=np.zeros(len(sums)), where=sums[:, 1] > 0)
    if kind in ("entities", "classes"):
        k = stats.shape[1] // 3
        tp, predicted, actual = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:]
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                       where=(precision + recall) > 0)
        which = metric.rsplit("_", 1)[-1]  # overall_f1, f1, precision, ...
        return {"precision": precision, "recall": recall, "f1": f1}[which].mean(axis=1)
    if kind in ("bleu", "chrf"):
        scorer = _sacrebleu(kind)
        return np.array([scorer._compute_score_from_stats(list(s)).score for s in sums])
    raise ValueError(f"unknown row statistics kind {kind!r} (known: {', '.join(KINDS)})")


def resample_weights(n_rows: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_rows) counts of each row in each bootstrap resample, seeded."""
    return np.random.default_rng(seed).multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=resamples)


def figure(metric: str, row: RowStats) -> float:
    """The metric on the whole eval set, from its row statistics."""
    return float(scores(metric, row, np.ones((1, len(row["stats"]))))[0])


def interval(metric: str, row: RowStats, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
             seed: int = SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of `metric` over the eval rows."""
    values = scores(metric, row, resample_weights(len(row["stats"]), resamples, seed))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(metric: str, challenger: RowStats, champion: RowStats, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """(difference, low, high): challenger minus champion on the same eval rows, and the percentile interval of
    that difference over paired resamples (both models scored on the same resampled rows)."""
    n = len(challenger["stats"])
    if len(champion["stats"]) != n or challenger["kind"] != champion["kind"]:
        raise ValueError(f"{metric}: the two models' row statistics differ in rows or kind; they were not "
                         "evaluated on the same eval set")
    weights = resample_weights(n, resamples, seed)
    differences = scores(metric, challenger, weights) - scores(metric, champion, weights)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    return figure(metric, challenger) - figure(metric, champion), float(low), float(high)


def squad_stats(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, RowStats]:
    """SQuAD `exact_match` and `f1` (0-100) of each row against its best answer, as the `squad` module scores."""
    from hfbatch.tasks.metrics import metric_script

    squad = metric_script("squad")
    exact = [100.0 * max(float(squad.normalize(p) == squad.normalize(t)) for t in truths)
             for p, truths in zip(predictions, answers)]
    f1 = [100.0 * max(squad.f1(p, t) for t in truths) for p, truths in zip(predictions, answers)]
    return {"exact_match": mean_stats(exact), "f1": mean_stats(f1)}


def rouge_stats(types: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, RowStats]:
    """Each row's ROUGE F-measures (`types`), as the `rouge` module scores them (the corpus figure: their mean)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=False)
    rows = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {t: mean_stats([s[t].fmeasure for s in rows]) for t in types}


def metrics_text(metrics: dict, intervals: dict | None = None) -> str:
    """`accuracy 0.7901 [0.7626, 0.8177], f1 0.7843`: each metric with its interval where known."""
    intervals = intervals or {}
    return ", ".join(f"{k} {v:.4f}" + (f" [{intervals[k][0]:.4f}, {intervals[k][1]:.4f}]" if k in intervals else "")
                     for k, v in metrics.items() if isinstance(v, (int, float)))
