"""Extractive question answering in bulk: `answer`, `score`, `start`, `end` of the best answer span of
each question in its context, as the removed `pipeline("question-answering")` gave them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.inputs import TEXT
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.batching import pad_batch, token_budget_batches
from hfbatch.tasks.engine.encoder import Encoded, EncoderPredictor


class QuestionAnsweringOptions(Options):
    max_answer_len: int = Field(15, ge=1, description="longest answer, in tokens")
    handle_impossible_answer: bool = Field(False, description="allow no answer "
                                           "(SQuAD 2.0 style models)")


class QuestionAnsweringPredictor(EncoderPredictor[QuestionAnsweringOptions]):
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

    task = "question-answering"
    heads = ("ForQuestionAnswering",)
    options_class = QuestionAnsweringOptions
    auto_class = "AutoModelForQuestionAnswering"

    @classmethod
    def inputs(cls, options):
        return {"question": TEXT, "context": TEXT}

    def __init__(self, model: ModelRef, options: QuestionAnsweringOptions, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"question-answering needs a fast tokenizer; {model.source!r} has none")
        self.question_first = self.tokenizer.padding_side == "right"
        self.max_seq_len = min(self.tokenizer.model_max_length, 384, self.max_length)
        self.doc_stride = min(self.max_seq_len // 2, 128)

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

    def preprocess(self, inputs: dict[str, list[str]], row_ids: list[str] | None = None) -> Windows:
        """Each question and its context as a pair, the context cut into overlapping windows."""
        questions, contexts = inputs["question"], inputs["context"]
        first, second = (questions, contexts) if self.question_first else (contexts, questions)
        enc = self.tokenizer(first, second, truncation="only_second" if self.question_first else "only_first",
                             max_length=self.max_seq_len, stride=self.doc_stride, return_token_type_ids=True,
                             return_overflowing_tokens=True, return_offsets_mapping=True)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") if "token_type_ids" in self.tokenizer.model_input_names else None
        return Windows(ids, types, np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), enc, contexts)

    def _forward(self, features: Windows, batch_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each window's start and end logits, unpadded."""
        import torch

        ids, lengths = features.ids, features.lengths
        logits: list = [None] * len(ids)
        with self.lock, torch.inference_mode(), self._kernels():
            for rows in token_budget_batches(lengths, batch_tokens):
                batch = pad_batch(rows, ids, features.types, lengths, self.pad_id)
                out = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in batch.items()})
                start = out.start_logits.float().cpu().numpy()
                end = out.end_logits.float().cpu().numpy()
                for j, r in enumerate(rows):
                    logits[r] = (start[j, : lengths[r]], end[j, : lengths[r]])
        return logits

    def postprocess(self, outputs: list[tuple[np.ndarray, np.ndarray]], features: Windows) -> pa.Table:
        """The best span of each row over its windows, as the pipeline scores and aligns them."""
        enc, contexts = features.encoding, features.contexts
        owner = enc["overflow_to_sample_mapping"]
        answers: list[list[dict]] = [[] for _ in contexts]
        null_score = [1000000.0] * len(contexts)
        context_index = 1 if self.question_first else 0
        for f, (start, end) in enumerate(outputs):
            i = owner[f]
            encoding = enc.encodings[f]
            # p_mask as the pipeline builds it: 1 outside the context, the CLS token kept
            p_mask = np.array([[s != 1 if self.question_first else 0 for s in encoding.sequence_ids]], dtype=np.int64)
            p_mask[0, np.nonzero(np.asarray(features.ids[f]) == self.tokenizer.cls_token_id)[0]] = 0
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
        return pa.table({"answer": pa.array([b["answer"] for b in best], pa.string()),
                         "score": pa.array([b["score"] for b in best], pa.float32()),
                         "start": pa.array([b["start"] for b in best], pa.int32()),
                         "end": pa.array([b["end"] for b in best], pa.int32())}, schema=self.schema)

    def tokens(self, features: Windows) -> int:
        return int(features.lengths.sum())


@dataclass
class Windows(Encoded):
    """The tokenized windows of a batch of rows, with the tokenizer's encoding and the contexts."""

    encoding: Any
    contexts: list[str]


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
