"""Evaluate: a classifier on a tokenized eval set → metrics through the `evaluate` library."""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from .errors import DataError
from .fingerprint import digest
from .ingest import DatasetRef
from .metrics import AVAILABLE, metric_path
from .models import ModelRef, load_classifier, load_tokenizer, pick_device
from .store import MARKER, Store

EVAL_VERSION = 1
DEFAULT_METRICS = ("accuracy", "precision", "recall", "f1")


@dataclass(frozen=True)
class EvalResult:
    store: str
    key: str
    model: str
    model_fingerprint: str
    dataset_fingerprint: str
    num_rows: int
    label_names: tuple[str, ...]
    metrics: dict
    per_class: dict
    confusion_matrix: list

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.key}"


def evaluate_model(model: ModelRef, data: DatasetRef, store: Store,
                   metrics: tuple[str, ...] = DEFAULT_METRICS, batch_size: int = 64) -> EvalResult:
    """Predict `data` (tokenized, with labels) with `model` and compute `metrics` (macro and per class)."""
    import evaluate
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    unknown = [m for m in metrics if m not in AVAILABLE]
    if unknown:
        raise DataError(f"unknown metric(s) {unknown}; available: {list(AVAILABLE)}")
    key = "evals/" + digest("eval", EVAL_VERSION, model.fingerprint, data.fingerprint, list(metrics))
    if store.is_complete(key):
        meta = store.read_json(f"{key}/{MARKER}")
        return EvalResult(**{**meta, "label_names": tuple(meta["label_names"])})

    net = load_classifier(model)
    to_data_id = _label_mapping(net.config.id2label, data.label_names, model.source)
    ds = data.load()
    with tempfile.TemporaryDirectory() as tmp:
        device, precision = pick_device()
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to=[],
                                 use_cpu=device == "cpu", bf16_full_eval=precision == "bf16",
                                 fp16_full_eval=precision == "fp16", disable_tqdm=True)
        tokenizer = load_tokenizer(model)
        out = Trainer(model=net, args=args, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer)).predict(ds)
    predictions = to_data_id[np.asarray(out.predictions).argmax(-1)]
    references = np.asarray(ds["label"])
    labels = list(range(len(data.label_names)))

    combined = evaluate.combine([evaluate.load(metric_path(m)) for m in metrics])
    scores = combined.compute(predictions=predictions, references=references, average="macro", labels=labels)
    per_class = {}
    for m in (m for m in metrics if m != "accuracy"):
        values = evaluate.load(metric_path(m)).compute(predictions=predictions, references=references,
                                                        average=None, labels=labels)[m]
        per_class[m] = dict(zip(data.label_names, values))
    per_class["support"] = dict(zip(data.label_names, np.bincount(references, minlength=len(labels)).tolist()))
    matrix = evaluate.load(metric_path("confusion_matrix")).compute(
        predictions=predictions, references=references, labels=labels)["confusion_matrix"]

    result = EvalResult(store=store.url, key=key, model=model.source, model_fingerprint=model.fingerprint,
                        dataset_fingerprint=data.fingerprint, num_rows=len(references),
                        label_names=data.label_names, metrics=scores, per_class=per_class,
                        confusion_matrix=matrix)
    with store.staging(key, meta=asdict(result)) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(scores, indent=2))
        (tmp / "per_class.json").write_text(json.dumps(per_class, indent=2))
        (tmp / "confusion_matrix.json").write_text(json.dumps(
            {"labels": list(data.label_names), "matrix": matrix}, indent=2))
    return result


def _label_mapping(id2label: dict, label_names: tuple[str, ...], source: str) -> np.ndarray:
    """Model class id → eval-set label id, matched by name; fails if a class name is unknown."""
    index = {n: i for i, n in enumerate(label_names)}
    model_names = [id2label[i] for i in range(len(id2label))]
    missing = [n for n in model_names if n not in index]
    if missing:
        raise DataError(f"model {source!r} predicts labels {missing} that the eval set does not have "
                        f"(eval labels: {list(label_names)})")
    return np.array([index[n] for n in model_names])


def per_class_table(result: EvalResult) -> list[dict]:
    """Rows of the per-class report: label, each metric, support."""
    return [{"label": name, **{m: round(v[name], 4) for m, v in result.per_class.items() if m != "support"},
             "support": result.per_class["support"][name]} for name in result.label_names]


def confusion_markdown(result: EvalResult) -> str:
    names = list(result.label_names)
    head = "| reference \\ predicted | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1)
    rows = [f"| **{n}** | " + " | ".join(str(v) for v in row) + " |"
            for n, row in zip(names, result.confusion_matrix)]
    return "\n".join([head, *rows])

