"""Extractive question answering: the answer span of a question in its context. Trained as transformers'
`run_qa.py` trains it (question/context pairs, long contexts cut into overlapping windows, the answer's
first and last token as labels), evaluated as `utils_qa.py` and the `squad` metric do it (the best span
over an example's windows, SQuAD F1 and exact match), and run in bulk with the answers of the removed
`pipeline("question-answering")`."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.engine.predictor import EncoderPredictor, pad_batch, token_budget_batches
from hfbatch.tasks.metrics import compute
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.recipes.base import Options, Recipe, first_bad_row, require_columns
from hfbatch.tasks.recipes.qa_spans import answer_positions, best_answers, window_offsets

EXAMPLES_SHOWN = 20
"""Eval examples whose prediction and answers the evaluation details show."""


class Columns(Options):
    question_column: str = Field("question", description="question-answering: column of the question")
    context_column: str = Field("context", description="question-answering: column of the text holding the answer")
    answers_column: str = Field("answers", description="question-answering: column of the answers, in SQuAD "
                                "layout: {text: [...], answer_start: [...]} (character offsets in the context)")
    doc_stride: int = Field(128, ge=1, description="question-answering: tokens shared by consecutive windows of "
                            "a context longer than max_length")


class QuestionAnsweringOptions(Options):
    max_answer_len: int = Field(15, ge=1, description="question-answering: longest answer, in tokens")
    handle_impossible_answer: bool = Field(False, description="question-answering: allow no answer "
                                           "(SQuAD 2.0 style models)")


class QuestionAnsweringPredictor(EncoderPredictor):
    """`answer`, `score`, `start`, `end` (character span in the context) of the best answer span, as
    transformers' `pipeline("question-answering")` returns them (with its defaults: `top_k=1`,
    `max_seq_len=min(384, model_max_length)`, `doc_stride=min(max_seq_len // 2, 128)`,
    `max_answer_len=15`, `align_to_words=True`).

    transformers 5 removed that pipeline; this is its algorithm, run in token-budget batches: the
    question and context are encoded as a pair (context truncated, long contexts cut into overlapping
    windows), start/end logits outside the context are masked, each window's softmax scores spans up
    to `max_answer_len` tokens, the best 12 spans per window are aligned to whole words and the scores
    of equal answers (case-insensitive) are added across windows. The postprocessing follows the
    pipeline's numpy code step for step (including its tie order), so answers are the pipeline's.
    """

    inputs = ("question", "context")

    def __init__(self, model: ModelRef, options: QuestionAnsweringOptions, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"question-answering needs a fast tokenizer; {model.source!r} has none")
        self.question_first = self.tokenizer.padding_side == "right"
        self.max_seq_len = min(self.tokenizer.model_max_length, 384, self.max_length)
        self.doc_stride = min(self.max_seq_len // 2, 128)

    def _load(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(self.model_ref.path, **self._load_kwargs())

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("answer", pa.string()), ("score", pa.float32()), ("start", pa.int32()),
                          ("end", pa.int32())])

    def problem(self, row: dict[str, str]) -> str | None:
        # The tokenizer cannot cut a context into windows when the question leaves no room for it.
        n = len(self.tokenizer(row["question"], add_special_tokens=False)["input_ids"])
        if n + 3 + self.doc_stride >= self.max_seq_len:
            return f"question too long: {n} tokens, at most {self.max_seq_len - self.doc_stride - 4} fit"
        return None

    def predict(self, inputs: dict[str, list[str]], batch_tokens: int) -> tuple[pa.Table, int]:
        import torch

        questions, contexts = inputs["question"], inputs["context"]
        if not questions:
            return self.schema.empty_table(), 0
        first, second = (questions, contexts) if self.question_first else (contexts, questions)
        enc = self.tokenizer(first, second, truncation="only_second" if self.question_first else "only_first",
                             max_length=self.max_seq_len, stride=self.doc_stride, return_token_type_ids=True,
                             return_overflowing_tokens=True, return_offsets_mapping=True)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        owner = enc["overflow_to_sample_mapping"]
        use_types = types is not None and "token_type_ids" in self.tokenizer.model_input_names
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        logits: list = [None] * len(ids)
        with self.lock, torch.inference_mode(), self._kernels():
            for rows in token_budget_batches(lengths, batch_tokens):
                batch = pad_batch(rows, ids, types if use_types else None, lengths, self.pad_id)
                out = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in batch.items()})
                start = out.start_logits.float().cpu().numpy()
                end = out.end_logits.float().cpu().numpy()
                for j, r in enumerate(rows):
                    logits[r] = (start[j, : lengths[r]], end[j, : lengths[r]])
        answers: list[list[dict]] = [[] for _ in questions]
        null_score = [1000000.0] * len(questions)
        context_index = 1 if self.question_first else 0
        for f, (start, end) in enumerate(logits):
            i = owner[f]
            encoding = enc.encodings[f]
            # p_mask as the pipeline builds it: 1 outside the context, the CLS token kept
            p_mask = np.array([[s != 1 if self.question_first else 0 for s in encoding.sequence_ids]], dtype=np.int64)
            p_mask[0, np.nonzero(np.asarray(ids[f]) == self.tokenizer.cls_token_id)[0]] = 0
            starts, ends, scores, null_score[i] = _select_starts_ends(
                start[None], end[None], p_mask, np.ones_like(p_mask), null_score[i], 12,  # top_k * 2 + 10
                self.options.handle_impossible_answer, self.options.max_answer_len)
            for s, e, score in zip(starts, ends, scores):
                a, b = _answer_chars(encoding, int(s), int(e), context_index)
                text = contexts[i][a:b]
                same = next((x for x in answers[i] if x["answer"].lower() == text.lower()), None)
                if same:
                    same["score"] += score.item()
                else:
                    answers[i].append({"score": score.item(), "start": a, "end": b, "answer": text})
        best = []
        for i, found in enumerate(answers):
            if self.options.handle_impossible_answer:
                found.append({"score": null_score[i], "start": 0, "end": 0, "answer": ""})
            found = sorted(found, key=lambda x: x["score"], reverse=True)
            best.append(found[0] if found else {"score": 0.0, "start": 0, "end": 0, "answer": ""})
        table = pa.table({"answer": pa.array([b["answer"] for b in best], pa.string()),
                          "score": pa.array([b["score"] for b in best], pa.float32()),
                          "start": pa.array([b["start"] for b in best], pa.int32()),
                          "end": pa.array([b["end"] for b in best], pa.int32())}, schema=self.schema)
        return table, int(lengths.sum())


def _select_starts_ends(start, end, p_mask, attention_mask, min_null_score, top_k, handle_impossible_answer,
                        max_answer_len):
    """transformers 4.x `select_starts_ends` + `decode_spans` (Apache-2.0), on one window's [1, L] logits."""
    undesired_tokens = np.abs(np.array(p_mask) - 1) & attention_mask
    undesired_tokens_mask = undesired_tokens == 0.0
    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if top_k == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < top_k:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, top_k)[0:top_k]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    # as in the pipeline, `nonzero()` of the 2-D mask also lists row 0, so token 0 (CLS) counts as desired
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores, min_null_score


def _answer_chars(encoding, s: int, e: int, sequence_index: int) -> tuple[int, int]:
    """The pipeline's `get_indices(align_to_words=True)`: widen the token span to whole words."""
    try:
        start_word, end_word = encoding.token_to_word(s), encoding.token_to_word(e)
        return (encoding.word_to_chars(start_word, sequence_index=sequence_index)[0],
                encoding.word_to_chars(end_word, sequence_index=sequence_index)[1])
    except Exception:
        return encoding.offsets[s][0], encoding.offsets[e][1]


class QuestionAnswering(Recipe):
    task = "question-answering"
    predictor = QuestionAnsweringPredictor
    infer_options = QuestionAnsweringOptions
    train_options = Columns
    model_class = "AutoModelForQuestionAnswering"
    heads = ("ForQuestionAnswering",)
    group_by_length = True  # windows run from a few dozen tokens to max_length
    metrics: ClassVar[tuple[str, ...]] = ("f1", "exact_match")
    max_length = 384
    train_defaults: ClassVar[dict] = {"epochs": 1.0, "batch_size": 16, "learning_rate": 2e-4, "weight_decay": 0.01,
                                      "warmup_ratio": 0.1}

    def prepare(self, dataset, src: str, options: Columns, label_names):
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

    def tokenize(self, dataset, tokenizer, options: Columns, max_length: int, split: str):
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

    def compute_metrics(self, predictions, references, label_names, metrics):
        scores = compute(("squad",), predictions, references)
        shown = [{"id": p["id"], "prediction": p["prediction_text"], "answers": r["answers"]["text"]}
                 for p, r in zip(predictions[:EXAMPLES_SHOWN], references)]
        return {m: float(scores[m]) for m in metrics}, {"examples": shown}

    def detail_artifacts(self, details, label_names):
        return {"examples": ("table", [{"id": e["id"], "prediction": e["prediction"],
                                        "answers": " | ".join(dict.fromkeys(e["answers"]))}
                                       for e in details["examples"]])}

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


def _answers(table: pa.Table, src: str, options: Columns) -> pa.Array:
    """The answers column as `struct<text: list<string>, answer_start: list<int32>>`: at least one answer
    a row, each `answer_start` pointing at its text in the context."""
    column, values = options.answers_column, table[options.answers_column]
    kind = values.type
    fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)} if pa.types.is_struct(kind) else {}
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


def _windows(batch: dict, rows: list[int], tokenizer, options: Columns, max_length: int):
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


def _train_windows(batch, rows, tokenizer, options: Columns, max_length: int) -> dict:
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


def _eval_windows(batch, rows, tokenizer, options: Columns, max_length: int) -> dict:
    enc, context_index = _windows(batch, rows, tokenizer, options, max_length)
    out = {k: enc[k] for k in tokenizer.model_input_names if k in enc}
    owners = enc["overflow_to_sample_mapping"]
    out["example_id"] = [batch["id"][example] for example in owners]
    out["offset_mapping"] = [[o if s == context_index else None for o, s in zip(enc["offset_mapping"][w],
                                                                                 enc.sequence_ids(w))]
                             for w in range(len(owners))]
    return out
