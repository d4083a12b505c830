"""Row statistics, bootstrap intervals and the evidence gate (`tasks/metrics/paired.py`, `Registry._gate`)."""
import json
import math

import numpy as np
import pytest

from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.metrics import paired
from hfbatch.tasks.recipes import get_recipe

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "big", "small", "red", "blue"]


def _texts(rng, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(2, 9))) for _ in range(n)]


def _noisy(rng, texts: list[str]) -> list[str]:
    """Each text with some words replaced (some rows unchanged): partial overlap with the original."""
    out = []
    for t in texts:
        words = t.split()
        out.append(" ".join(w if rng.random() < 0.7 else str(rng.choice(WORDS)) for w in words))
    return out


def _tags(rng, n: int) -> list[list[str]]:
    vocab = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    return [list(rng.choice(vocab, rng.integers(3, 12))) for _ in range(n)]


def _cases(rng):
    """(task, predictions, references, label names) in the form each recipe's `compute_metrics` takes."""
    n = 240
    gold_ids = rng.integers(0, 3, n)
    yield "text-classification", np.where(rng.random(n) < 0.7, gold_ids, rng.integers(0, 3, n)).tolist(), \
        gold_ids.tolist(), ("a", "b", "c")
    gold_tags = _tags(rng, n)
    yield "token-classification", [[t if rng.random() < 0.8 else "O" for t in row] for row in gold_tags], gold_tags, ()
    answers = _texts(rng, n)
    yield "question-answering", [{"id": str(i), "prediction_text": p} for i, p in enumerate(_noisy(rng, answers))], \
        [{"id": str(i), "answers": {"text": [a, a.upper()], "answer_start": [0, 0]}} for i, a in enumerate(answers)], ()
    choices = rng.choice(["positive", "negative"], n).tolist()
    yield "text-generation", [c if rng.random() < 0.8 else "neutral" for c in choices], choices, ("positive", "negative")
    references = _texts(rng, n)
    yield "text-generation", _noisy(rng, references), references, ()
    yield "translation", _noisy(rng, references), [[r] for r in references], ()
    yield "summarization", _noisy(rng, references), references, ()


def test_each_recipes_row_statistics_give_its_metrics_exactly():
    """The gate resamples the very figures evaluation reports: on all rows, the row statistics give each
    metric as the recipe's `compute_metrics` computes it (by the `evaluate` modules), for every task."""
    seen = set()
    for task, predictions, references, labels in _cases(np.random.default_rng(0)):
        recipe = get_recipe(task)
        metrics = tuple(m for m in recipe.metrics if m != "loss" and (m != "accuracy" or labels))
        scores, _ = recipe.compute_metrics(predictions, references, labels, metrics)
        rows = recipe.row_statistics(predictions, references, labels, metrics)
        assert set(rows) == set(metrics), task
        for metric, row in rows.items():
            assert len(row["stats"]) == len(predictions)
            assert math.isclose(paired.figure(metric, row), scores[metric], rel_tol=1e-6, abs_tol=1e-9), \
                (task, metric, paired.figure(metric, row), scores[metric])
            seen.add(row["kind"])
    assert seen == set(paired.KINDS)


def test_the_interval_covers_the_true_value_about_as_often_as_it_says():
    """On a synthetic case with a known truth (rows correct with probability 0.8), the 95 % percentile
    bootstrap interval holds 0.8 in about 95 % of 300 eval sets of 300 rows."""
    rng = np.random.default_rng(1)
    covered = []
    for k in range(300):
        row = paired.mean_stats(rng.random(300) < 0.8)
        low, high = paired.interval("accuracy", row, seed=k)
        covered.append(low <= 0.8 <= high)
    assert 0.91 <= np.mean(covered) <= 0.98, np.mean(covered)


def _trained(store: Store, run_key: str) -> TrainedModel:
    key = f"runs/{run_key}/model"
    with store.staging(key) as tmp:
        (tmp / "model.safetensors").write_bytes(run_key.encode())
    return TrainedModel(store=store.url, key=key, run_key=run_key, task="text-classification", base_model="base",
                        base_revision=None, base_fingerprint="b" * 8, dataset_fingerprint="d" * 8,
                        label_names=("neg", "pos"), config={}, device="cpu", precision="fp32", global_step=1,
                        resumed_from_step=0, train_samples=10, train_samples_per_second=1.0, train_loss=0.5)


def _evaluated(store: Store, run_key: str, correct: np.ndarray) -> EvalResult:
    """An evaluation of 'accuracy' whose rows are `correct`, kept in the store as evaluation keeps them."""
    key = f"evals/{run_key}"
    row = paired.mean_stats(correct)
    with store.staging(key) as tmp:
        (tmp / paired.ROWS_FILE).write_text(json.dumps({"accuracy": row}))
    return EvalResult(store=store.url, key=key, model=run_key, model_fingerprint=run_key, dataset_fingerprint="E",
                      num_rows=len(correct), label_names=("neg", "pos"), metrics={"accuracy": float(np.mean(correct))},
                      intervals={"accuracy": list(paired.interval("accuracy", row))})


@pytest.mark.parametrize("margin", [0.0, 0.01])
def test_the_gate_promotes_on_evidence_only(tmp_path, margin):
    store = Store(str(tmp_path))
    registry = Registry(store, "m")
    rng = np.random.default_rng(2)
    champion_rows = rng.random(872) < 0.79
    first = _evaluated(store, "r1", champion_rows)
    assert registry.register(_trained(store, "r1"), first).promoted

    # the same weights, evaluated again: equal on every row, never promoted
    same = registry.register(_trained(store, "r2"), _evaluated(store, "r2", champion_rows), margin=margin,
                             champion=first)
    assert not same.promoted and same.reason.startswith("not promoted: accuracy +0.0000 [+0.0000, +0.0000]")

    # the case: one row more right (0.7901 -> 0.7913), a point estimate above the champion's
    one_more = champion_rows.copy()
    one_more[np.flatnonzero(~champion_rows)[0]] = True
    nudged = registry.register(_trained(store, "r3"), _evaluated(store, "r3", one_more), margin=margin,
                               champion=first)
    assert not nudged.promoted
    assert "not promoted: accuracy +0.0011 [" in nudged.reason and "872 eval rows" in nudged.reason

    # clearly better: half of the champion's errors fixed
    better_rows = champion_rows.copy()
    errors = np.flatnonzero(~champion_rows)
    better_rows[errors[: len(errors) // 2]] = True
    better = registry.register(_trained(store, "r4"), _evaluated(store, "r4", better_rows), margin=margin,
                               champion=first)
    assert better.promoted and better.reason.startswith("promoted: accuracy +0.1")
    entry = registry.load()["versions"][-1]
    low, high = entry["intervals"]["accuracy"]
    assert low < entry["metrics"]["accuracy"] < high and entry["eval_key"] == "evals/r4"
    card = (tmp_path / "models/m/4/README.md").read_text()
    assert f"| accuracy | {entry['metrics']['accuracy']:.4f} | [{low:.4f}, {high:.4f}] |" in card


def test_without_row_statistics_the_gate_says_it_compared_point_estimates(tmp_path):
    store = Store(str(tmp_path))
    registry = Registry(store, "m")

    def bare(run_key: str, accuracy: float) -> EvalResult:
        return EvalResult(store=store.url, key=f"evals/{run_key}", model=run_key, model_fingerprint=run_key,
                          dataset_fingerprint="E", num_rows=10, label_names=(), metrics={"accuracy": accuracy})

    first = bare("r1", 0.7)
    registry.register(_trained(store, "r1"), first)
    reg = registry.register(_trained(store, "r2"), bare("r2", 0.8), champion=first)
    assert reg.promoted and reg.reason.endswith("(point estimates: no row statistics of this metric for both)")
