"""Task heads: turn columns of input strings into prediction columns, as `transformers.pipeline` would.

Text classification and feature extraction run the model directly, which is where the speed is:
the rows of a shard are sorted by token length, cut into batches by a token budget (rows × longest
row ≤ `batch_tokens`), padded only to the longest row of their batch, and run under
`torch.inference_mode()`; on the CPU several batches run at once, each on one thread (`streams.py`);
results go back in input order. Scores are computed exactly as the
pipeline computes them (softmax for single-label models, sigmoid for one label or multi-label ones,
raw logits for regression), so labels are the pipeline's and scores agree to float rounding.

Fill-mask, token classification (aggregated entities) and zero-shot classification hand each
length-sorted list of rows to the real `pipeline` object: correct by construction, with the
sharding, streaming and exactly-once machinery around it unchanged.

A predictor is loaded once per process and reused by every shard (`get_predictor`).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import ConfigError
from ..models import ModelRef, pick_device
from ..settings import get_settings

TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
CLOSE_CALL_GAP = 0.2
"""int8 text classification: rows whose two best scores are closer than this are scored again in fp32."""


@dataclass(frozen=True)
class TaskOptions:
    """Task-specific options (each ignored by the tasks it does not apply to)."""

    top_k: int = 5
    """fill-mask: number of tokens to return."""
    candidate_labels: tuple[str, ...] = ()
    """zero-shot-classification: the labels to score (required)."""
    hypothesis_template: str = "This example is {}."
    multi_label: bool = False
    aggregation_strategy: str = "simple"
    """token-classification: how word pieces are merged into entities."""
    max_answer_len: int = 15
    """question-answering: longest answer span, in tokens (the pipeline's default)."""
    handle_impossible_answer: bool = False
    """question-answering: allow the empty answer (SQuAD 2.0 style models)."""
    precision: str = "auto"
    """`auto`: fp32 on CPU, bf16/fp16 on CUDA (outputs as `pipeline` gives them). `int8`: the linear
    layers dynamically quantized to int8, on CPU: faster, scores approximate (text classification scores
    its close calls again in fp32, so labels are almost always the pipeline's)."""


PRECISIONS = ("auto", "int8")


def canonical_task(task: str) -> str:
    task = TASK_ALIASES.get(task, task)
    if task not in PREDICTORS:
        raise ConfigError(f"unsupported task {task!r}; choose one of {sorted(set(PREDICTORS) | set(TASK_ALIASES))}")
    return task


def input_names(task: str) -> tuple[str, ...]:
    """The logical inputs of `task`, each mapped to a column of the input."""
    return PREDICTORS[canonical_task(task)].inputs


class Predictor:
    """Base class: `predict` maps `{input name: list of str}` to a table of prediction columns."""

    task: str = ""
    inputs: tuple[str, ...] = ("text",)
    first_token_head = False
    """Sequence classification: the head may read the first token only (`first_token.py`)."""
    rescores_close_calls = False
    """int8: every encoder layer quantized, and the rows whose two best scores are close scored again by
    the fp32 model (`close_calls`), instead of the first layer kept in fp32 for every row."""

    def __init__(self, model: ModelRef, options: TaskOptions):
        self.model_ref, self.options = model, options
        self.device, self.precision = pick_device()
        if options.precision == "int8":
            if self.device != "cpu":
                raise ConfigError(f"precision 'int8' is a CPU mode; on {self.device} use 'auto' ({self.precision}), "
                                  "or set HFBATCH_DEVICE=cpu to run on this host's CPU")
            self.precision = "int8"
        if self.device == "cpu":
            from .allocator import keep_freed_memory

            keep_freed_memory()
        self.lock = threading.Lock()

    @property
    def schema(self) -> pa.Schema:
        raise NotImplementedError

    def problem(self, row: dict[str, str]) -> str | None:
        """Why a (non-empty, string) row cannot be predicted, or None."""
        return None

    def predict(self, inputs: dict[str, list[str]], batch_tokens: int) -> tuple[pa.Table, int]:
        """Prediction columns for the rows, in input order, and the number of real tokens processed."""
        raise NotImplementedError

    @staticmethod
    def check_options(options: TaskOptions) -> None:
        """Raise `ConfigError` for options this task cannot run with (before any model is loaded)."""

    @property
    def batch_tokens(self) -> int:
        """Default token budget of one batch: small on a CPU, where batches are not faster per token past
        a few thousand tokens and each stream (`streams.py`) holds one batch (MiniLM, mixed SST-2/IMDb rows,
        two streams: 2,048 to 8,192 tokens equally fast on 800 rows; peak RSS over the loaded model for
        400 rows +0.54 GB at 4,096, +0.83 GB at 8,192); large on a GPU, where a batch costs kernel launches
        and Python time."""
        return 65_536 if self.device == "cuda" else 4096

    def _kernels(self):
        """Run the model with these attention kernels. On CUDA, not cuDNN's: it builds a plan for every
        new (rows, width) shape, ~45 ms each on an H200, and token-budget batches come in many shapes."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def _prepare(self, model):
        """`model` on this predictor's device, in eval mode, its last layer cut to the first token where
        the head reads only that (on CPU: on CUDA the forward passes are a small part of the time), its
        linear layers int8 where asked."""
        from .first_token import first_token_only

        model = model.to(self.device).eval()
        self.first_token_only = self.first_token_head and self.device == "cpu" and first_token_only(model)
        if self.precision != "int8":
            return model
        from .quantize import quantize_int8

        if self.rescores_close_calls:
            self.exact_model = model
        return quantize_int8(model, keep_first_layer=not self.rescores_close_calls)


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, pad_slack: float = 0.1, min_slack: int = 8
                         ) -> list[np.ndarray]:
    """Row indices sorted by length, cut so that rows × longest row ≤ `batch_tokens` per batch (a row
    longer than the budget gets a batch of its own) and so that no row is padded by more than
    `max(min_slack, pad_slack × shortest row)` tokens: padding is compute thrown away, and a budget
    alone would let one batch span lengths 5 to 100 (half its tokens padding on mixed data)."""
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        if (i == len(order) or (i + 1 - start) * ordered[i] > batch_tokens
                or ordered[i] > ordered[start] + max(min_slack, pad_slack * ordered[start])):
            batches.append(order[start:i])
            start = i
    return batches


class EncoderPredictor(Predictor):
    """Shared machinery of the direct paths: tokenize without padding, sort, budget, pad, forward."""

    def __init__(self, model: ModelRef, options: TaskOptions):
        super().__init__(model, options)
        from ..models import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.model = self._prepare(self._load())
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(x for x in limits if x and x < 1_000_000)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.rescored_rows = 0
        """Rows scored again in fp32 so far (int8 close calls)."""

    def _load(self):
        raise NotImplementedError

    def _load_kwargs(self) -> dict:
        settings = get_settings()
        kwargs = dict(use_safetensors=not settings.allow_pickle_weights, trust_remote_code=settings.trust_remote_code)
        if self.device == "cuda":
            kwargs["dtype"] = self._torch_dtype()
        return kwargs

    def _forward(self, model, batch: dict) -> np.ndarray:
        """One row of `model`'s output per batch row (float32, on the CPU)."""
        raise NotImplementedError

    def _table(self, outputs: np.ndarray) -> pa.Table:
        raise NotImplementedError

    def _empty_output(self) -> np.ndarray:
        raise NotImplementedError

    def predict(self, inputs: dict[str, list[str]], batch_tokens: int) -> tuple[pa.Table, int]:
        texts = inputs["text"]
        if not texts:
            return self._table(self._empty_output()), 0
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        outputs = self._outputs(self.model, ids, types, lengths, batch_tokens)
        if self.precision == "int8" and self.rescores_close_calls:
            close = self.close_calls(outputs)
            with self.lock:  # shards of a thread runner share this predictor
                self.rescored_rows += len(close)
            if len(close):
                outputs[close] = self._outputs(self.exact_model, [ids[i] for i in close],
                                               None if types is None else [types[i] for i in close],
                                               lengths[close], batch_tokens)
        return self._table(outputs), int(lengths.sum())

    def _outputs(self, model, ids: list, types: list | None, lengths: np.ndarray, batch_tokens: int) -> np.ndarray:
        """`_forward` of `model` over the tokenized rows, in token-budget batches, back in row order. On
        the CPU the batches run on `cpu_streams()`, several at once; on CUDA one after another."""
        import torch

        left = self.tokenizer.padding_side == "left"

        def run(rows: np.ndarray) -> np.ndarray:
            width = int(lengths[rows].max())
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            token_types = np.zeros((len(rows), width), dtype=np.int64) if types is not None else None
            for j, r in enumerate(rows):
                n = lengths[r]
                span = slice(width - n, width) if left else slice(0, n)
                input_ids[j, span], mask[j, span] = ids[r], 1
                if token_types is not None:
                    token_types[j, span] = types[r]
            batch = {"input_ids": input_ids, "attention_mask": mask}
            if token_types is not None:
                batch["token_type_ids"] = token_types
            with torch.inference_mode(), self._kernels():
                return self._forward(model, {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()})

        batches = token_budget_batches(lengths, batch_tokens)[::-1]  # the longest rows, the costliest, first
        if self.device == "cpu":
            from .streams import cpu_streams

            results = cpu_streams().map(run, batches)
        else:
            with self.lock:  # shards of a thread runner share this predictor
                results = [run(rows) for rows in batches]
        outputs: np.ndarray | None = None
        for rows, out in zip(batches, results):
            if outputs is None:
                outputs = np.empty((len(ids),) + out.shape[1:], dtype=out.dtype)
            outputs[rows] = out
        return outputs


class TextClassification(EncoderPredictor):
    """`label` and `score` of the top class, as `pipeline("text-classification")` returns them."""

    task = "text-classification"
    first_token_head = True
    rescores_close_calls = True

    def _load(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.model_ref.path, **self._load_kwargs())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("label", pa.string()), ("score", pa.float32())])

    def _function(self) -> str:
        """The pipeline's default `function_to_apply` for this model's config."""
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        if config.problem_type == "single_label_classification" or config.num_labels > 1:
            return "softmax"
        return getattr(config, "function_to_apply", None) or "none"

    def _forward(self, model, batch: dict) -> np.ndarray:
        return model(**batch).logits.float().cpu().numpy()

    def _empty_output(self) -> np.ndarray:
        return np.zeros((0, self.model.config.num_labels), dtype=np.float32)

    def _scores(self, logits: np.ndarray) -> np.ndarray:
        # numpy float32, exactly as the pipeline's postprocess, so scores match to the last bit
        function = self._function()
        if function == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        if function == "softmax":
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            return shifted / shifted.sum(axis=-1, keepdims=True)
        return logits

    def close_calls(self, logits: np.ndarray) -> np.ndarray:
        """Rows whose two best scores are less than `CLOSE_CALL_GAP` apart: the rows whose label int8's
        rounding may have changed. With every layer int8, the fine-tuned MiniLM SST-2 classifier's
        scores move by up to 0.27-0.45 on 800 mixed SST-2/IMDb rows; 22-26 labels changed, 7.6-7.8 % of
        the rows are close calls, and 1-3 labels stay changed once those are scored in fp32 (with the
        first layer in fp32 instead, and no rescoring: 7-12)."""
        if logits.shape[-1] < 2:
            return np.zeros(0, dtype=np.int64)
        top2 = np.sort(self._scores(logits), axis=-1)[:, -2:]
        return np.flatnonzero(top2[:, 1] - top2[:, 0] < CLOSE_CALL_GAP)

    def _table(self, logits: np.ndarray) -> pa.Table:
        scores = self._scores(logits)
        best = scores.argmax(axis=-1)
        id2label = self.model.config.id2label
        labels = [id2label[int(i)] for i in best]
        return pa.table({"label": pa.array(labels, pa.string()),
                         "score": pa.array(scores.max(axis=-1) if len(scores) else [], pa.float32())},
                        schema=self.schema)


class FeatureExtraction(EncoderPredictor):
    """`embedding`: the mean over tokens (padding excluded) of the last hidden state.

    `pipeline("feature-extraction")` returns one vector per token; the pooled vector here equals
    `np.mean(pipeline(text)[0], axis=0)` (and, for sentence-transformers checkpoints with mean
    pooling such as all-MiniLM-L6-v2, their embedding before normalisation).
    """

    task = "feature-extraction"

    def _load(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_ref.path, **self._load_kwargs())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("embedding", pa.list_(pa.float32(), self.model.config.hidden_size))])

    def _forward(self, model, batch: dict) -> np.ndarray:
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1)).cpu().numpy()

    def _empty_output(self) -> np.ndarray:
        return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)

    def _table(self, pooled: np.ndarray) -> pa.Table:
        values = pa.array(pooled.astype(np.float32, copy=False).ravel(), pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, self.model.config.hidden_size)
        return pa.table({"embedding": column}, schema=self.schema)


class PipelinePredictor(Predictor):
    """Delegates each shard's rows (length-sorted, in small batches) to the real `pipeline` object."""

    pipeline_batch_size = 8
    squeezes_single_row = False

    def __init__(self, model: ModelRef, options: TaskOptions):
        super().__init__(model, options)
        from transformers import pipeline

        kwargs = {"dtype": self._torch_dtype()} if self.device == "cuda" else {}
        self.pipe = pipeline(self.task, model=model.path, tokenizer=model.path, device=self.device,
                             **self._pipeline_kwargs(), **kwargs)
        self.pipe.model = self._prepare(self.pipe.model)

    def _pipeline_kwargs(self) -> dict:
        return {}

    def _call_kwargs(self) -> dict:
        return {}

    def _rows(self, results: list) -> dict[str, list]:
        raise NotImplementedError

    def predict(self, inputs: dict[str, list[str]], batch_tokens: int) -> tuple[pa.Table, int]:
        texts = inputs["text"]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list = [None] * len(texts)
        if texts:
            with self.lock, self._kernels():
                out = self.pipe([texts[i] for i in order], batch_size=self.pipeline_batch_size,
                                **self._call_kwargs())
            if len(texts) == 1 and self.squeezes_single_row:
                out = [out]  # the pipeline returns a one-row list's result unwrapped
            for i, r in zip(order, out):
                results[i] = r
        return pa.table(self._rows(results), schema=self.schema), 0


class FillMask(PipelinePredictor):
    """`predictions`: the top-k tokens for the (single) mask token, with scores and filled sequences."""

    task = "fill-mask"
    squeezes_single_row = True

    @property
    def schema(self) -> pa.Schema:
        item = pa.struct([("token", pa.int32()), ("token_str", pa.string()), ("score", pa.float32()),
                          ("sequence", pa.string())])
        return pa.schema([("predictions", pa.list_(item))])

    @staticmethod
    def check_options(options: TaskOptions) -> None:
        if options.top_k < 1:
            raise ConfigError(f"fill-mask needs top_k >= 1, got {options.top_k}")

    def problem(self, row: dict[str, str]) -> str | None:
        mask = self.pipe.tokenizer.mask_token
        n = row["text"].count(mask)
        return None if n == 1 else f"expected exactly one mask token {mask}, found {n}"

    def _call_kwargs(self) -> dict:
        return {"top_k": self.options.top_k}

    def _rows(self, results: list) -> dict[str, list]:
        return {"predictions": [[{k: p[k] for k in ("token", "token_str", "score", "sequence")} for p in r]
                                for r in results]}


class TokenClassification(PipelinePredictor):
    """`entities`: the pipeline's aggregated entities (group, score, word, character span)."""

    task = "token-classification"

    @property
    def schema(self) -> pa.Schema:
        item = pa.struct([("entity_group", pa.string()), ("score", pa.float32()), ("word", pa.string()),
                          ("start", pa.int32()), ("end", pa.int32())])
        return pa.schema([("entities", pa.list_(item))])

    def _pipeline_kwargs(self) -> dict:
        return {"aggregation_strategy": self.options.aggregation_strategy}

    def _rows(self, results: list) -> dict[str, list]:
        keys = ("entity_group", "score", "word", "start", "end")
        return {"entities": [[{k: e.get(k, e.get("entity")) for k in keys} for e in r] for r in results]}


class ZeroShotClassification(PipelinePredictor):
    """`label`/`score` of the best candidate label, and all `labels`/`scores` (best first)."""

    task = "zero-shot-classification"
    first_token_head = True

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("label", pa.string()), ("score", pa.float32()), ("labels", pa.list_(pa.string())),
                          ("scores", pa.list_(pa.float32()))])

    @staticmethod
    def check_options(options: TaskOptions) -> None:
        if not options.candidate_labels:
            raise ConfigError("zero-shot-classification needs candidate_labels")

    def _call_kwargs(self) -> dict:
        return {"candidate_labels": list(self.options.candidate_labels),
                "hypothesis_template": self.options.hypothesis_template, "multi_label": self.options.multi_label}

    def _rows(self, results: list) -> dict[str, list]:
        return {"label": [r["labels"][0] for r in results], "score": [r["scores"][0] for r in results],
                "labels": [r["labels"] for r in results], "scores": [r["scores"] for r in results]}


class QuestionAnswering(EncoderPredictor):
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
    inputs = ("question", "context")

    def __init__(self, model: ModelRef, options: TaskOptions):
        super().__init__(model, options)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"question-answering needs a fast tokenizer; {model.source!r} has none")
        self.question_first = self.tokenizer.padding_side == "right"
        self.max_seq_len = min(self.tokenizer.model_max_length, 384, self.max_length)
        self.doc_stride = min(self.max_seq_len // 2, 128)

    def _load(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(self.model_ref.path, **self._load_kwargs())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("answer", pa.string()), ("score", pa.float32()), ("start", pa.int32()),
                          ("end", pa.int32())])

    @staticmethod
    def check_options(options: TaskOptions) -> None:
        if options.max_answer_len < 1:
            raise ConfigError(f"question-answering needs max_answer_len >= 1, got {options.max_answer_len}")

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
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        logits: list = [None] * len(ids)
        with self.lock, torch.inference_mode(), self._kernels():
            for rows in token_budget_batches(lengths, batch_tokens):
                width = int(lengths[rows].max())
                input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                token_types = np.zeros((len(rows), width), dtype=np.int64)
                for j, r in enumerate(rows):
                    n = lengths[r]
                    input_ids[j, :n], mask[j, :n] = ids[r], 1
                    if types is not None:
                        token_types[j, :n] = types[r]
                batch = {"input_ids": input_ids, "attention_mask": mask}
                if types is not None and "token_type_ids" in self.tokenizer.model_input_names:
                    batch["token_type_ids"] = token_types
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


PREDICTORS: dict[str, type[Predictor]] = {
    p.task: p for p in (TextClassification, FeatureExtraction, QuestionAnswering, FillMask, TokenClassification,
                        ZeroShotClassification)
}

_CACHE: dict[tuple, Predictor] = {}
_CACHE_LOCK = threading.Lock()


def get_predictor(task: str, model: ModelRef, options: TaskOptions = TaskOptions()) -> Predictor:
    """The predictor for `task` and `model`, loaded on first use and then reused by every shard of
    this process (a worker loads each model once)."""
    cls = PREDICTORS[canonical_task(task)]
    key = (cls.task, model.path, model.fingerprint, options, pick_device())
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = cls(model, options)
        return _CACHE[key]
