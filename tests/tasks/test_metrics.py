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
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metric_path("bleu")
