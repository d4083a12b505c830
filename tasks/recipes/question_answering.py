"""Extractive question answering: the answer span of a question in its context. Trained as transformers'
`run_qa.py` trains it (question/context pairs, long contexts cut into overlapping windows, the answer's
first and last token as labels), evaluated as `utils_qa.py` and the `squad` metric do it (the best span
over an example's windows, SQuAD F1 and exact match) (in bulk: `predictors/question_answering.py`)."""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.metrics import compute, paired
from hfbatch.tasks.predictors.question_answering import QuestionAnsweringPredictor
from hfbatch.tasks.recipes.base import Recipe, first_bad_row, require_columns
from hfbatch.tasks.recipes.qa_spans import answer_positions, best_answers, window_offsets

EXAMPLES_SHOWN = 20
"""Eval examples whose prediction and answers the evaluation details show."""


class QuestionAnsweringColumns(Options):
    question_column: str = Field("question", description="column of the question")
    context_column: str = Field("context", description="column of the text holding the answer")
    answers_column: str = Field("answers", description="column of the answers, in SQuAD "
                                "layout: {text: [...], answer_start: [...]} (character offsets in the context)")
    doc_stride: int = Field(128, ge=1, description="tokens shared by consecutive windows of "
                            "a context longer than max_length")


class QuestionAnswering(Recipe[QuestionAnsweringColumns]):
    task = "question-answering"
    options_class = QuestionAnsweringColumns
    model_class = "AutoModelForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    heads = QuestionAnsweringPredictor.heads
    group_by_length = True  # windows run from a few dozen tokens to max_length
    metrics: ClassVar[tuple[str, ...]] = ("f1", "exact_match")
    max_length = 384
    train_defaults: ClassVar[dict] = {"epochs": 1.0, "batch_size": 16, "learning_rate": 2e-4, "weight_decay": 0.01,
                                      "warmup_ratio": 0.1}

    def prepare(self, dataset, src: str, options: QuestionAnsweringColumns, label_names):
        """`id`, `question`, `context` and `answers` (SQuAD layout), every answer checked against its
        context; ids are the source's `id` column (as strings, unique), else the row numbers."""
        import datasets

        table = dataset.data.table
        require_columns(table, src, options)
        for column in (options.question_column, options.context_column):
            _check_text(table, src, column)
        answers = _answers(table, src, options)
        if "id" in table.column_names:
            ids = pc.cast(table["id"], pa.string())
            first_bad_row(pc.is_null(ids), src, "id", "is null")
            seen: dict[str, int] = {}
            for row, value in enumerate(ids.to_pylist()):
                if seen.setdefault(value, row) != row:
                    raise DataError(f"{src!r} row {row}: column 'id' repeats the id {value!r} of row {seen[value]}")
        else:
            ids = pa.array([str(i) for i in range(table.num_rows)], pa.string())
        out = pa.table({"id": ids, "question": pc.cast(table[options.question_column], pa.string()),
                        "context": pc.cast(table[options.context_column], pa.string()), "answers": answers})
        features = datasets.Features({
            "id": datasets.Value("string"), "question": datasets.Value("string"),
            "context": datasets.Value("string"),
            "answers": {"text": datasets.List(datasets.Value("string")),
                        "answer_start": datasets.List(datasets.Value("int32"))}})
        return datasets.Dataset(out).cast(features), ()

    def tokenize(self, dataset, tokenizer, options: QuestionAnsweringColumns, max_length: int, split: str):
        """Windows of `max_length` tokens over each question/context pair (the context cut, windows
        sharing `doc_stride` tokens). `train`: the answer's first and last token in each window
        (`start_positions`, `end_positions`; the CLS token's index when the answer is not wholly inside
        it). `eval`: each window's `example_id` and `offset_mapping` (None outside the context)."""
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        if options.doc_stride + specials + 1 >= max_length:
            raise ConfigError(f"doc_stride {options.doc_stride} leaves no room for a question in windows of "
                              f"{max_length} tokens; lower --doc-stride or raise --max-length")
        window = _train_windows if split == "train" else _eval_windows
        return dataset.map(lambda batch, rows: window(batch, rows, tokenizer, options, max_length),
                           with_indices=True, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                           desc=f"tokenize {split}")


    def postprocess(self, predictions, features, examples, tokenizer, model_config, label_names, options):
        """Each example's best span over its windows (`qa_spans.best_answers`), as the squad metric
        takes it: `[{id, prediction_text}]` and `[{id, answers}]`."""
        start_logits, end_logits = predictions[0], predictions[1]
        bounds, starts, ends = window_offsets(features.with_format("arrow")["offset_mapping"])
        ids, contexts = examples["id"], examples["context"]
        texts = best_answers(start_logits, end_logits, features["example_id"], bounds, starts, ends, ids, contexts)
        return ([{"id": i, "prediction_text": t} for i, t in zip(ids, texts)],
                [{"id": i, "answers": a} for i, a in zip(ids, examples["answers"])])

    def output_table(self, predictions, predicted, model_config):
        return pa.table({"answer": pa.array([p["prediction_text"] for p in predicted], pa.string())})

    def row_statistics(self, predictions, references, label_names, metrics):
        answers = {p["id"]: p["prediction_text"] for p in predictions}
        stats = paired.squad_stats([answers[r["id"]] for r in references], [r["answers"]["text"] for r in references])
        return {m: stats[m] for m in metrics if m in stats}

    def compute_metrics(self, predictions, references, label_names, metrics):
        scores = compute(("squad",), predictions, references)
        shown = [{"id": p["id"], "prediction": p["prediction_text"], "answers": r["answers"]["text"]}
                 for p, r in zip(predictions[:EXAMPLES_SHOWN], references)]
        return {m: float(scores[m]) for m in metrics}, {"examples": shown}

    def card_text(self, label_names):
        return {"summary": "An extractive question-answering model",
                "intended_use": "Finding the answer to an English question as a span of a given context "
                                "paragraph, in the domain of the training data.",
                "limitations": (("It always answers with a span of the context: it cannot tell that the "
                                 "context does not hold the answer (trained on questions that all have one)."),
                                ("Contexts longer than the training `max_length` are read in overlapping "
                                 "windows; answers of more than 30 tokens (15 in bulk inference) are never given."))}


def _check_text(table: pa.Table, src: str, column: str) -> None:
    values = table[column]
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        raise DataError(f"column {column!r} of {src!r} is {values.type}, not text")
    first_bad_row(pc.is_null(values), src, column, "is null")
    first_bad_row(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), src, column, "is empty")


def _answers(table: pa.Table, src: str, options: QuestionAnsweringColumns) -> pa.Array:
    """The answers column as `struct<text: list<string>, answer_start: list<int32>>`: at least one answer
    a row, each `answer_start` pointing at its text in the context."""
    column, values = options.answers_column, table[options.answers_column]
    kind = values.type
    fields = ({kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)} if pa.types.is_struct(kind)
              else {})
    if not (_list_of(fields.get("text"), pa.types.is_string, pa.types.is_large_string)
            and _list_of(fields.get("answer_start"), pa.types.is_integer)):
        raise DataError(f"column {column!r} of {src!r} is {kind}; answers must be in SQuAD layout, "
                        "{text: [strings], answer_start: [character offsets]}")
    first_bad_row(pc.is_null(values), src, column, "is null")
    rows = values.to_pylist()
    texts, starts = [r["text"] for r in rows], [r["answer_start"] for r in rows]
    for row, (context, text, start) in enumerate(zip(table[options.context_column].to_pylist(), texts, starts)):
        if not text or not start or len(text) != len(start):
            raise DataError(f"{src!r} row {row}: column {column!r} needs as many answer texts as answer_starts, "
                            f"and at least one (got {text!r}, {start!r})")
        for t, s in zip(text, start):
            if not t or s is None or s < 0 or context[s:s + len(t)] != t:
                found = context[s:s + len(t or "")] if isinstance(s, int) and s >= 0 else None
                raise DataError(f"{src!r} row {row}: column {column!r}: answer_start {s} does not point at its "
                                f"text {t!r} in column {options.context_column!r} (found {found!r} there)")
    return pa.StructArray.from_arrays([pa.array(texts, pa.list_(pa.string())),
                                       pa.array(starts, pa.list_(pa.int32()))], names=["text", "answer_start"])


def _list_of(kind, *is_item) -> bool:
    return (kind is not None and (pa.types.is_list(kind) or pa.types.is_large_list(kind))
            and any(test(kind.value_type) for test in is_item))


def _windows(batch: dict, rows: list[int], tokenizer, options: QuestionAnsweringColumns, max_length: int):
    """The tokenized windows of a batch of examples, and the index of the context in a pair."""
    questions = [q.lstrip() for q in batch["question"]]  # as run_qa: leading spaces only cost room
    # the tokenizer panics (it does not raise) when a question leaves no room for the stride
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - options.doc_stride
    lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for j, n in enumerate(lengths):
        if n >= room:
            raise DataError(f"row {rows[j]} (id {batch['id'][j]!r}): the question is {n} tokens long; "
                            f"with max_length {max_length} and doc_stride {options.doc_stride} at most "
                            f"{room - 1} fit (column {options.question_column!r})")
    question_first = tokenizer.padding_side == "right"
    pair = (questions, batch["context"]) if question_first else (batch["context"], questions)
    enc = tokenizer(*pair, truncation="only_second" if question_first else "only_first", max_length=max_length,
                    stride=options.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    return enc, 1 if question_first else 0


def _train_windows(batch, rows, tokenizer, options: QuestionAnsweringColumns, max_length: int) -> dict:
    enc, context_index = _windows(batch, rows, tokenizer, options, max_length)
    out = {k: enc[k] for k in tokenizer.model_input_names if k in enc}
    out["start_positions"], out["end_positions"] = [], []
    special = [t for t in (tokenizer.cls_token_id, tokenizer.bos_token_id) if t is not None]
    for w, example in enumerate(enc["overflow_to_sample_mapping"]):
        ids = enc["input_ids"][w]
        cls = next((ids.index(t) for t in special if t in ids), 0)
        answers = batch["answers"][example]  # the first answer, as run_qa
        start = answers["answer_start"][0]
        s, e = answer_positions(enc["offset_mapping"][w], enc.sequence_ids(w), context_index, start,
                                start + len(answers["text"][0]), cls)
        out["start_positions"].append(s)
        out["end_positions"].append(e)
    return out


def _eval_windows(batch, rows, tokenizer, options: QuestionAnsweringColumns, max_length: int) -> dict:
    enc, context_index = _windows(batch, rows, tokenizer, options, max_length)
    out = {k: enc[k] for k in tokenizer.model_input_names if k in enc}
    owners = enc["overflow_to_sample_mapping"]
    out["example_id"] = [batch["id"][example] for example in owners]
    out["offset_mapping"] = [[o if s == context_index else None for o, s in zip(enc["offset_mapping"][w],
                                                                                 enc.sequence_ids(w))]
                             for w in range(len(owners))]
    return out
