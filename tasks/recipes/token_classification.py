"""Token classification (named entities): a token classifier fine-tuned on rows of words and their IOB2
tags, as transformers' `run_ner.py` does it (each word's tag on its first sub-token), scored with
seqeval's entity-level precision, recall and F1 (overall and per entity type) (in bulk:
`predictors/token_classification.py`)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.metrics import compute, paired
from hfbatch.tasks.predictors.token_classification import TokenClassificationPredictor
from hfbatch.tasks.recipes.base import Recipe, require_columns

IGNORED = -100
"""The label of sub-tokens the loss and the metrics skip (PyTorch's cross-entropy `ignore_index`)."""
TAG_PATTERN = r"^(O|[BIES]-.+)$"
"""Tags seqeval reads: `O`, or a prefix (IOB2's B- and I-, or IOBES' E- and S-) and an entity type."""


class TokenClassificationColumns(Options):
    tokens_column: str = Field("tokens", description="column of the words of a row "
                                                     "(a list of strings)")
    tags_column: str = Field("ner_tags", description="column of the words' IOB2 tags "
                                                     "(a list of names, or of ids with ClassLabel names)")


class TokenClassification(Recipe[TokenClassificationColumns]):
    task = "token-classification"
    aliases = TokenClassificationPredictor.aliases
    options_class = TokenClassificationColumns
    model_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    heads = TokenClassificationPredictor.heads
    group_by_length = True  # CoNLL-style data mixes one-word lines with long sentences
    metrics: ClassVar[tuple[str, ...]] = ("overall_f1", "overall_precision", "overall_recall", "overall_accuracy")
    train_defaults: ClassVar[dict] = {"epochs": 2.0, "batch_size": 32, "learning_rate": 1e-4, "warmup_ratio": 0.1}
    """Chosen for MiniLM-L6 on CoNLL-2003 (goal: entity F1 >= 0.80 within 30 minutes on 2 CPU cores), which
    `benchmarks/ner_quality.py` measures: a small model's learning rate and two passes over the data, which
    leave margin on both the F1 and the time."""

    def prepare(self, dataset, src: str, options: TokenClassificationColumns, label_names):
        """`tokens` (lists of strings) and `tags` (lists of `ClassLabel` ids). The tag names: `label_names`
        (an eval set takes its training set's), else the source's `ClassLabel` names, else its sorted
        distinct tags with `O` first."""
        import datasets

        table = dataset.data.table
        require_columns(table, src, options)
        tokens = _word_lists(table, src, options.tokens_column)
        tags, names = _tag_ids(table, dataset.features, src, options, tokens, label_names)
        features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                      "tags": datasets.Sequence(datasets.ClassLabel(names=list(names)))})
        return datasets.Dataset(pa.table({"tokens": tokens, "tags": tags})).cast(features), names

    def tokenize(self, dataset, tokenizer, options: TokenClassificationColumns, max_length: int, split: str):
        """The words as pre-split input, truncated to `max_length`, each word's tag on its first sub-token."""

        def encode(batch):
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            enc["labels"] = [first_subtoken_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch["tags"])]
            return enc

        return dataset.map(encode, batched=True, batch_size=1000, remove_columns=["tokens", "tags"], desc="tokenize")

    def collator(self, tokenizer, model):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORED)

    def model_kwargs(self, label_names):
        return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                "label2id": {n: i for i, n in enumerate(label_names)}, "ignore_mismatched_sizes": True}

    def postprocess(self, predictions, features, examples, tokenizer, model_config, label_names, options):
        """Tag sequences of the words the model saw (first sub-tokens; words truncated away are left out of
        both sides): the model's tags through its `id2label`, the references through the eval set's."""
        model_tags = [model_config.id2label[i] for i in range(len(model_config.id2label))]
        unknown = [t for t in model_tags if t not in label_names]
        if unknown:
            raise DataError(f"model {model_config.name_or_path!r} predicts tags {unknown} that the eval set does "
                            f"not have (eval tags: {list(label_names)})")
        model_tags, data_tags = np.array(model_tags, dtype=object), np.array(label_names, dtype=object)
        best = np.asarray(predictions).argmax(-1)
        predicted, references = [], []
        for row, labels in zip(best, features["labels"]):
            labels = np.asarray(labels, dtype=np.int64)
            keep = labels != IGNORED
            predicted.append(model_tags[row[: len(labels)][keep]].tolist())
            references.append(data_tags[labels[keep]].tolist())
        return predicted, references

    def output_table(self, predictions, predicted, model_config):
        """Each row's entities by type, as bulk inference's `entities` column holds them (one per B- tag,
        or per I- tag that opens a span)."""
        rows = []
        for tags in predicted:
            starts = [t[2:] for i, t in enumerate(tags) if t.startswith("B-") or (
                t.startswith("I-") and (i == 0 or tags[i - 1][2:] != t[2:] or tags[i - 1] == "O"))]
            rows.append([{"entity_group": group} for group in starts])
        return pa.table({"entities": pa.array(rows, pa.list_(pa.struct([("entity_group", pa.string())])))})

    def compute_metrics(self, predictions, references, label_names, metrics):
        scores = compute(("seqeval",), predictions, references)
        per_type = {name: value for name, value in scores.items() if isinstance(value, dict)}
        counts = {"predicted": sum(len(entities(tags)) for tags in predictions),
                  "reference": sum(len(entities(tags)) for tags in references)}
        return {m: scores[m] for m in metrics}, {"per_type": per_type, "entities": counts}

    def row_statistics(self, predictions, references, label_names, metrics):
        found = paired.entity_stats([set(entities(p)) for p in predictions], [set(entities(r)) for r in references])
        stats = {f"overall_{m}": found for m in ("precision", "recall", "f1")}
        stats["overall_accuracy"] = paired.ratio_stats([sum(a == b for a, b in zip(p, r)) for p, r in
                                                        zip(predictions, references)], [len(r) for r in references])
        return {m: stats[m] for m in metrics if m in stats}

    def check_training_data(self, dataset, label_names, src):
        """Some entities to learn from; an entity type with under 1 % of the mentions is a warning."""
        names = np.array(label_names, dtype=object)
        counts: dict[str, int] = dict.fromkeys(sorted({t.split("-", 1)[1] for t in label_names if t != "O"}), 0)
        for labels in dataset["labels"]:
            labels = np.asarray(labels, dtype=np.int64)
            for kind, _, _ in entities(names[labels[labels != IGNORED]].tolist()):
                counts[kind] = counts.get(kind, 0) + 1
        total = sum(counts.values())
        if total == 0:
            raise DataError(f"training data {src!r} has no entity tags (every word is 'O'): a tagger needs some; "
                            "check the tags column")
        return [f"entity type {kind!r} has {n} of {total} training mentions ({n / total:.2%}): predictions of it "
                "are unreliable" for kind, n in counts.items() if n < 0.01 * total]

    def gate_problem(self, metrics, details):
        """A model that tags no entity in an eval set that has some."""
        counts = details.get("entities", {})
        if counts.get("predicted") == 0 and counts.get("reference"):
            return "it tags no entity in the eval set (a degenerate model)"
        return None

    def card_text(self, label_names):
        types = sorted({t.split("-", 1)[1] for t in label_names if t != "O"})
        return {"summary": "A token classifier (named-entity tagger)",
                "intended_use": "Finding entities of the types " + ", ".join(f"`{t}`" for t in types)
                                + " in text like the training data's (its language and domain).",
                "limitations": (("Each word's entity tag is learnt on its first sub-token only; in bulk inference "
                                 "`--aggregation-strategy first` tags whole words that way."),
                                ("Sentences longer than the training `max_length` (in sub-tokens) are truncated "
                                 "in training and evaluation."),
                                "Entity types other than those listed are not recognised.")}


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """The (type, first word, last word) of each entity in a tag sequence, as seqeval reads them."""
    from seqeval.metrics.sequence_labeling import get_entities

    return get_entities(tags)


def first_subtoken_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """The tag of each word on its first sub-token, `IGNORED` on its other sub-tokens and on special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORED if word is None or word == previous else tags[word])
        previous = word
    return labels


def _list_column(table: pa.Table, src: str, column: str, what: str) -> pa.ListArray:
    """`column` as one list array, with a `DataError` unless it holds lists, none of them null or empty."""
    values = table[column]
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        raise DataError(f"column {column!r} of {src!r} is {values.type}, not a list of {what} per row")
    values = values.combine_chunks()
    _first_bad_row(pc.is_null(values), src, column, f"is null (a row needs a list of {what})")
    _first_bad_row(pc.equal(pc.list_value_length(values), 0), src, column, f"is an empty list of {what}")
    return values


def _word_lists(table: pa.Table, src: str, column: str) -> pa.ListArray:
    words = _list_column(table, src, column, "words")
    if not (pa.types.is_string(words.type.value_type) or pa.types.is_large_string(words.type.value_type)):
        raise DataError(f"column {column!r} of {src!r} is {words.type}; words must be strings")
    flat, rows = pc.list_flatten(words), pc.list_parent_indices(words)
    _first_bad_row(pc.is_null(flat), src, column, "has a null word", rows)
    _first_bad_row(pc.equal(pc.utf8_length(flat), 0), src, column, "has an empty word", rows)
    return pc.cast(words, pa.list_(pa.string()))


def _tag_ids(table: pa.Table, features, src: str, options: TokenClassificationColumns, words: pa.ListArray,
             label_names):
    """The tags as lists of ids into the tag names, and those names."""
    column = options.tags_column
    tags = _list_column(table, src, column, "tags")
    _first_bad_row(pc.not_equal(pc.list_value_length(tags), pc.list_value_length(words)), src, column,
                   f"has a different number of tags than column {options.tokens_column!r} has words")
    flat, rows = pc.list_flatten(tags), pc.list_parent_indices(tags)
    _first_bad_row(pc.is_null(flat), src, column, "has a null tag", rows)
    feature = features.get(column) if features is not None else None
    source_names = getattr(getattr(feature, "feature", None), "names", None)
    if source_names is not None:  # ClassLabel ids → their names
        outside = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, len(source_names)))
        _first_bad_row(outside, src, column, f"has a tag id outside its ClassLabel's {len(source_names)} names", rows)
        flat = pc.take(pa.array(source_names, pa.string()), flat)
    elif pa.types.is_large_string(flat.type) or pa.types.is_string(flat.type):
        flat = pc.cast(flat, pa.string())
    else:
        raise DataError(f"column {column!r} of {src!r} is {tags.type}; tags must be names (e.g. B-PER) or ids "
                        "with ClassLabel names")
    if label_names is None:
        label_names = tuple(source_names) if source_names is not None else \
            tuple(sorted(pc.unique(flat).to_pylist(), key=lambda t: (t != "O", t)))
    ids = pc.index_in(flat, value_set=pa.array(list(label_names), pa.string()))
    unknown = pc.is_null(ids)
    if pc.any(unknown).as_py():
        i = int(np.flatnonzero(unknown.to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src!r} row {rows[i].as_py()}: unknown tag {flat[i].as_py()!r} in column {column!r} "
                        f"(known tags: {list(label_names)})")
    not_iob = pc.invert(pc.match_substring_regex(flat, TAG_PATTERN))
    if pc.any(not_iob).as_py():
        i = int(np.flatnonzero(not_iob.to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src!r} row {rows[i].as_py()}: tag {flat[i].as_py()!r} in column {column!r} is not an "
                        "IOB2 tag (O, B-TYPE or I-TYPE)")
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(tags).to_numpy())]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pc.cast(ids, pa.int64())), tuple(label_names)


def _first_bad_row(mask, src: str, column: str, what: str, rows=None) -> None:
    """A `DataError` naming the row of the first true value of `mask` (a value of a list column's flattened
    values when `rows`, their parent indices, is given)."""
    if pc.any(mask).as_py():
        i = int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
        row = i if rows is None else rows[i].as_py()
        raise DataError(f"{src!r} row {row}: column {column!r} {what}")
