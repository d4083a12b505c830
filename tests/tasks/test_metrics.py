import evaluate
import pytest

from hfbatch.tasks.metrics import metric_path


def test_local_metrics_load_offline_and_combine():
    combined = evaluate.combine([evaluate.load(metric_path(m)) for m in ("accuracy", "precision", "recall", "f1")])
    scores = combined.compute(predictions=[0, 1, 1, 0, 2], references=[0, 1, 0, 0, 2], average="macro",
                              labels=[0, 1, 2])
    # class 0: P=1, R=2/3; class 1: P=1/2, R=1; class 2: P=R=1
    assert scores["accuracy"] == pytest.approx(0.8)
    assert scores["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert scores["recall"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert scores["f1"] == pytest.approx((0.8 + 2 / 3 + 1) / 3)


def test_per_class_and_confusion_matrix_keep_absent_classes():
    f1 = evaluate.load(metric_path("f1")).compute(predictions=[0, 0, 1], references=[0, 1, 1], average=None,
                                                  labels=[0, 1, 2])
    assert f1["f1"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    cm = evaluate.load(metric_path("confusion_matrix")).compute(predictions=[0, 0, 1], references=[0, 1, 1],
                                                                labels=[0, 1, 2])
    assert cm["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="unknown metric .meteor."):
        metric_path("meteor")


def test_seqeval_module_equals_seqeval_on_conll_tags(data_dir):
    """Entity-level figures on real CoNLL-2003 tags, with some predictions damaged, against seqeval's own."""
    import random

    import pyarrow.parquet as pq
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    references = pq.read_table(data_dir / "conll2003" / "validation.parquet").slice(0, 300).column(
        "ner_tags").to_pylist()
    tags = sorted({t for row in references for t in row})
    rng = random.Random(0)
    predictions = [[rng.choice(tags) if rng.random() < 0.1 else t for t in row] for row in references]
    got = evaluate.load(metric_path("seqeval")).compute(predictions=predictions, references=references)
    assert got["overall_f1"] == pytest.approx(f1_score(references, predictions))
    assert got["overall_precision"] == pytest.approx(precision_score(references, predictions))
    assert got["overall_recall"] == pytest.approx(recall_score(references, predictions))
    assert got["overall_accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert set(got) >= {"PER", "ORG", "LOC", "MISC"} and 0.5 < got["overall_f1"] < 0.95
    assert got["PER"]["number"] == sum(t == "B-PER" for row in references for t in row)


def test_squad_module_follows_the_v1_1_definitions():
    """Exact match and F1 after SQuAD's normalisation, best of the reference answers, in percent."""
    refs = [{"id": "a", "answers": {"text": ["Denver Broncos", "The Broncos"], "answer_start": [0, 0]}},
            {"id": "b", "answers": {"text": ["Santa Clara, California"], "answer_start": [0]}},
            {"id": "c", "answers": {"text": ["gold"], "answer_start": [0]}}]
    preds = [{"id": "a", "prediction_text": "the Broncos!"},  # normalises to "broncos": exact for the 2nd
             {"id": "b", "prediction_text": "Santa Clara"},  # 2 of 2 predicted, 2 of 3 true: F1 0.8
             {"id": "c", "prediction_text": "silver"}]
    got = evaluate.load(metric_path("squad")).compute(predictions=preds, references=refs)
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_bleu_chrf_and_rouge_modules_equal_their_libraries(data_dir):
    import pyarrow.parquet as pq
    import sacrebleu
    from rouge_score import rouge_scorer

    wmt = pq.read_table(data_dir / "wmt22_de_en" / "test.parquet").slice(0, 200)
    # WMT22's two human translations of each sentence: one scored against the other
    references, hypotheses = wmt.column("ref_a").to_pylist(), wmt.column("ref_b").to_pylist()
    got = evaluate.load(metric_path("bleu")).compute(predictions=hypotheses, references=[[r] for r in references])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert 10 < got["bleu"] < 90
    chrf = evaluate.load(metric_path("chrf")).compute(predictions=hypotheses, references=[[r] for r in references])
    assert chrf["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    rouge = evaluate.load(metric_path("rouge")).compute(predictions=hypotheses, references=references)
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = sum(scorer.score(r, h)[kind].fmeasure for r, h in zip(references, hypotheses)) / len(references)
        assert rouge[kind] == pytest.approx(expected)
    assert 0.3 < rouge["rouge1"] < 1
