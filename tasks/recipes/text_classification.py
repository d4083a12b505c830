"""Text classification: a sequence classifier fine-tuned on (text, label) rows, scored with accuracy,
precision, recall and F1 (macro and per class) and a confusion matrix (in bulk: `predictors/text_classification.py`)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.metrics import compute, paired
from hfbatch.tasks.predictors.text_classification import TextClassificationPredictor, label_table
from hfbatch.tasks.recipes.base import Recipe, first_bad_row, require_columns


class TextClassificationColumns(Options):
    text_column: str = Field("text", description="column of the input text")
    label_column: str = Field("label", description="column of the class: names, ids, or a ClassLabel")


class TextClassification(Recipe[TextClassificationColumns]):
    task = "text-classification"
    aliases = TextClassificationPredictor.aliases
    options_class = TextClassificationColumns
    model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    heads = TextClassificationPredictor.heads
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "precision", "recall", "f1")
    stratify_by = "label"

    def prepare(self, dataset, src: str, options: TextClassificationColumns, label_names):
        """`text` (string) and `label` (a `ClassLabel`): label names from `label_names` (an eval set
        takes its training set's), else the source's `ClassLabel` names, else its sorted distinct values."""
        import datasets

        table, names = self._labelled(dataset.data.table, dataset.features, src, options, label_names)
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(names))})
        return datasets.Dataset(table.replace_schema_metadata(None)).cast(features), names

    @staticmethod
    def _labelled(table: pa.Table, features, src: str, options: TextClassificationColumns, label_names):
        text_column, label_column = options.text_column, options.label_column
        require_columns(table, src, options)
        text = table[text_column]
        if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
            raise DataError(f"column {text_column!r} of {src!r} is {text.type}, not text")
        first_bad_row(pc.is_null(text), src, text_column, "is null")
        first_bad_row(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), src, text_column, "is empty")

        labels = table[label_column]
        first_bad_row(pc.is_null(labels), src, label_column, "is null")
        source_names = getattr(features.get(label_column), "names", None) if features is not None else None
        if source_names is not None:  # ClassLabel ids → their names
            labels = pc.take(pa.array(source_names), labels)
        elif pa.types.is_integer(labels.type) or pa.types.is_boolean(labels.type) \
                or pa.types.is_large_string(labels.type):
            labels = pc.cast(labels, pa.string())
        elif not pa.types.is_string(labels.type):
            raise DataError(f"column {label_column!r} of {src!r} is {labels.type}; labels must be names or ids")
        if label_names is None:
            distinct = pc.unique(labels).to_pylist()
            if source_names is not None:
                label_names = tuple(source_names)
            elif all(v.lstrip("-").isdigit() for v in distinct):
                label_names = tuple(str(v) for v in sorted(int(v) for v in distinct))
            else:
                label_names = tuple(sorted(distinct))
        ids = pc.index_in(labels, value_set=pa.array(list(label_names)))
        bad = pc.is_null(ids)
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{src!r} row {row}: unknown label {labels[row].as_py()!r} in column "
                            f"{label_column!r} (known labels: {list(label_names)})")
        out = pa.table({"text": pc.cast(text, pa.string()), "label": pc.cast(ids, pa.int64())})
        return out, tuple(label_names)

    def tokenize(self, dataset, tokenizer, options: TextClassificationColumns, max_length: int, split: str):
        return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                           batched=True, batch_size=1000, remove_columns=["text"], desc="tokenize")

    def model_kwargs(self, label_names):
        return dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                    label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)

    def postprocess(self, predictions, features, examples, tokenizer, model_config, label_names, options):
        """Class ids of the eval set's labels (the model's classes matched by name)."""
        to_data_id = _label_mapping(model_config.id2label, label_names, model_config.name_or_path)
        return to_data_id[np.asarray(predictions).argmax(-1)].tolist(), list(features["label"])

    def compute_metrics(self, predictions, references, label_names, metrics):
        predicted, references = np.asarray(predictions), np.asarray(references)
        labels = list(range(len(label_names)))
        scores = compute(metrics, predicted, references, average="macro", labels=labels)
        per_class = {m: dict(zip(label_names, compute((m,), predicted, references, average=None, labels=labels)[m]))
                     for m in metrics if m != "accuracy"}
        per_class["support"] = dict(zip(label_names, np.bincount(references, minlength=len(labels)).tolist()))
        matrix = compute(("confusion_matrix",), predicted, references, labels=labels)["confusion_matrix"]
        return scores, {"per_class": per_class, "confusion_matrix": {"labels": list(label_names), "matrix": matrix}}

    def row_statistics(self, predictions, references, label_names, metrics):
        classes = paired.class_stats(predictions, references, len(label_names))
        stats = {"accuracy": paired.mean_stats(np.equal(predictions, references)), "precision": classes,
                 "recall": classes, "f1": classes}
        return {m: stats[m] for m in metrics if m in stats}

    def check_training_data(self, dataset, label_names, src):
        """At least two classes; a class under 1 % of the rows is a warning (extreme imbalance)."""
        counts = np.bincount(np.asarray(dataset["label"]), minlength=len(label_names))
        present = [n for n, c in zip(label_names, counts) if c]
        if len(present) < 2:
            raise DataError(f"training data {src!r} has a single class ({present}): a classifier needs at "
                            "least two; check the label column")
        total = int(counts.sum())
        return [f"class {n!r} has {c} of {total} training rows ({c / total:.2%}): predictions of it are unreliable"
                for n, c in zip(label_names, counts) if 0 < c < 0.01 * total]

    def gate_problem(self, metrics, details):
        """A model that predicts one class for every eval row, where the eval set has several."""
        if "confusion_matrix" not in details:
            return None
        matrix = np.asarray(details["confusion_matrix"]["matrix"])
        if (matrix.sum(axis=1) > 0).sum() > 1 and (matrix.sum(axis=0) > 0).sum() == 1:
            only = details["confusion_matrix"]["labels"][int(matrix.sum(axis=0).argmax())]
            return f"it predicts {only!r} for every eval row (a degenerate model)"
        return None

    def output_table(self, predictions, predicted, model_config):
        return label_table(np.asarray(predictions, dtype=np.float32), model_config)

    def card_text(self, label_names):
        labels = ", ".join(f"`{n}`" for n in label_names)
        return {"summary": "A sequence classifier",
                "intended_use": f"Classifying short English texts into {labels}, in the domain of the training data.",
                "limitations": ("Accuracy outside the training data's domain, language and text length is unknown.",
                                "Inputs longer than the training `max_length` are truncated.")}


def _label_mapping(id2label: dict, label_names: tuple[str, ...], source: str) -> np.ndarray:
    """Model class id → eval-set label id, matched by name; fails if a class name is unknown."""
    index = {n: i for i, n in enumerate(label_names)}
    model_names = [id2label[i] for i in range(len(id2label))]
    missing = [n for n in model_names if n not in index]
    if missing:
        raise DataError(f"model {source!r} predicts labels {missing} that the eval set does not have "
                        f"(eval labels: {list(label_names)})")
    return np.array([index[n] for n in model_names])
