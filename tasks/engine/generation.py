"""Bulk text generation: the engine behind translation, summarization, text2text-generation and
text-generation, and the predictor base those tasks share.

Each row gets the tokens `model.generate` would give it alone with the same generation config (the
model's `generation_config.json`, then the run's options): greedy search and beam search exactly, sampling
from the row's own `torch.Generator`, seeded from the run's seed and the row's id, so that a row's text
depends on neither the batch, the shard, the thread count nor a rerun.

How it is fast: the rows are sorted by cost (input tokens + tokens they may generate, the longest first)
and decoded with a key/value cache in lanes, one per CPU stream (`streams.py`, each lane on one thread)
or one on a GPU. A lane holds as many sequences as its token budget allows, counting the tokens still to
be generated; a row leaves as soon as it ends and, when a quarter of the budget is free, the next rows
are prefilled together and join the running batch (continuous batching, `generation_batch.py`), so no
step is spent on a finished row or on padding to the longest output of a fixed batch. Choosing tokens
(`generation_search.py`) and decoding the texts are done for the whole batch at once.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import threading
from typing import ClassVar

import pyarrow as pa
import torch
from pydantic import BaseModel

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.models import load_tokenizer
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.generation_batch import Row, Stepper, joinable
from hfbatch.tasks.engine.generation_search import Decoding
from hfbatch.tasks.engine.predictor import CUDA_BATCH_TOKENS, Predictor

log = logging.getLogger(__name__)

ADMIT_WHEN_FREE = 0.25
"""New rows join a lane once this share of its token budget is free, that share of the budget at a time:
a prefill is a forward pass of its own, worth doing for several rows at once, and lanes that take the
queue's rows a few at a time end together."""
CPU_GENERATION_TOKENS = 8192
"""Default token budget of one lane on a CPU (inputs plus the tokens to generate, per sequence)."""


class _Queue:
    """The rows still to start, the costliest first, shared by the lanes."""

    def __init__(self, rows: list[Row]):
        self.rows, self.next, self.lock = rows, 0, threading.Lock()

    def exhausted(self) -> bool:
        return self.next >= len(self.rows)

    def take(self, batch, budget: int, beams: int, group: int | None = None) -> list[Row]:
        """The next rows that fit beside `batch` in `budget` (sequences x largest cost), at most `group`
        tokens of them (their costs); at least one row when the lane is empty, even one larger than the
        budget."""
        size = batch.size if batch is not None else 0
        top = max((r.cost for r in batch.rows), default=0) if batch is not None else 0
        taken: list[Row] = []
        tokens = 0
        with self.lock:
            while self.next < len(self.rows):
                row = self.rows[self.next]
                if size and ((size + beams) * max(top, row.cost) > budget
                             or (group is not None and taken and tokens + beams * row.cost > group)):
                    break
                taken.append(row)
                size, top, self.next = size + beams, max(top, row.cost), self.next + 1
                tokens += beams * row.cost
        return taken


class GenerationEngine:
    """Generates for many rows at once with one model and one generation config."""

    def __init__(self, model, config, device: str, continuous: bool | None = None):
        self.device = device
        self.decoding = Decoding(model, copy.deepcopy(config), device)
        self.stepper = Stepper(model, self.decoding, device, continuous)

    @property
    def sampling(self) -> bool:
        return self.decoding.sample

    def generate(self, ids: list[list[int]], limits: list[int], budget: int, seeds: list[int] | None = None,
                 streams=None) -> list[tuple[list[int], str]]:
        """Each row's new tokens (to and with its end token) and its finish reason (`eos` or `length`).

        `ids` are the encoder inputs (encoder-decoder) or the prompts (decoder-only), `limits` the new
        tokens each row may generate, `budget` the tokens one lane may hold, `seeds` each row's sampling
        seed; `streams` (`streams.Streams`) runs one lane per stream, else one lane runs here."""
        rows = [Row(i, list(x), int(n), len(x) + int(n)) for i, (x, n) in enumerate(zip(ids, limits))]
        for row, seed in zip(rows, seeds or ()):
            row.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        queue = _Queue(sorted(rows, key=lambda r: -r.cost))
        with torch.inference_mode():
            if streams is None or streams.count <= 1:
                lanes = [self._lane(queue, budget)]
            else:
                lanes = streams.map(lambda _: self._lane(queue, budget), range(min(streams.count, len(rows))))
        results: list = [None] * len(rows)
        for lane in lanes:
            for index, tokens, reason in lane:
                results[index] = (tokens, reason)
        return results

    def _lane(self, queue: _Queue, budget: int) -> list[tuple[int, list[int], str]]:
        done: list[tuple[int, list[int], str]] = []
        batch, continuous = None, self.stepper.continuous
        with torch.inference_mode():
            while True:
                if batch is None or (continuous and batch.cost() <= (1 - ADMIT_WHEN_FREE) * budget):
                    group = queue.take(batch, budget, self.decoding.beams,
                                       int(ADMIT_WHEN_FREE * budget) if continuous else None)
                    if group:
                        new, logits = self.stepper.prefill(group)
                        continuous = continuous and joinable(new.cache)
                        self._advance(new, logits, done)
                        batch = new if batch is None else batch.merge(new)
                if batch is None or not batch.rows:
                    if queue.exhausted():
                        return done
                    batch = None
                    continue
                self._advance(batch, self.stepper.step(batch), done)
                if continuous:
                    batch.trim()

    def _advance(self, batch, logits: torch.Tensor, done: list) -> None:
        """Choose each sequence's next token; hand in the rows that ended and drop them from `batch`."""
        d = self.decoding
        if d.beams > 1:
            source, ended = d.choose_beams(logits, batch)
        else:
            source, ended = None, d.choose(logits, batch)
        ended = ended.tolist()
        for r, end in enumerate(ended):
            if end:
                done.append((batch.rows[r].index, *d.result(batch, r)))
        batch.keep(source, [r for r, end in enumerate(ended) if not end])


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed: from the run's seed and the row's id only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") & (2**63 - 1)


class GenerationPredictor(Predictor):
    """`generated_text`, `input_tokens` (after truncation), `output_tokens` (new tokens, to and with the end
    token) and `finish_reason` (`eos`, or `length` at the limit) of each row, by `GenerationEngine`.

    Inputs longer than the model takes are truncated, counted in `truncated_rows` and logged."""

    uses_row_ids = True
    model_class: ClassVar[str] = ""
    strip: ClassVar[bool] = True
    """Strip the decoded text (seq2seq outputs); text-generation keeps what `pipeline` gives."""

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("generated_text", pa.string()), ("input_tokens", pa.int32()),
                          ("output_tokens", pa.int32()), ("finish_reason", pa.string())])

    def __init__(self, model: ModelRef, options: BaseModel, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        if self.precision == "int8":
            raise ConfigError("precision 'int8' is not available for text generation tasks")
        import transformers

        self.tokenizer = load_tokenizer(model, settings)
        self.model = self._prepare(getattr(transformers, self.model_class).from_pretrained(model.path,
                                                                                          **self._load_kwargs()))
        self.generation_config = self._configure()
        self.engine = GenerationEngine(self.model, self.generation_config, self.device)
        self.truncated_rows = 0
        """Rows longer than the model takes, truncated so far."""

    @property
    def batch_tokens(self) -> int:
        return CUDA_BATCH_TOKENS if self.device == "cuda" else CPU_GENERATION_TOKENS

    def _configure(self):
        """The model's generation config with the options applied; sets the input and output limits."""
        raise NotImplementedError

    def _encode(self, inputs: dict[str, list]) -> tuple[list[list[int]], list[int]]:
        """Each row's input token ids (truncated) and new-token limit."""
        raise NotImplementedError

    def _tokenize(self, texts: list[str], cap: int, **kwargs) -> list[list[int]]:
        """`texts` tokenized and truncated to `cap` tokens; the rows that were longer are counted."""
        ids = self.tokenizer(texts, truncation=True, max_length=cap, **kwargs)["input_ids"]
        full = [i for i, x in enumerate(ids) if len(x) >= cap]
        if full:  # at the cap: cut, or exactly that long
            whole = self.tokenizer([texts[i] for i in full], verbose=False, **kwargs)["input_ids"]
            self._count_truncated(sum(len(x) > cap for x in whole), len(texts), cap)
        return ids

    def _count_truncated(self, n: int, rows: int, cap: int) -> None:
        if n:
            with self.lock:
                self.truncated_rows += n
            log.warning("%d of %d rows are longer than the %d input tokens %s takes: truncated", n, rows, cap,
                        self.model_ref.source)

    def predict(self, inputs: dict[str, list], batch_tokens: int, row_ids: list[str] | None = None
                ) -> tuple[pa.Table, int]:
        """Generated text for the rows, in input order. `row_ids` (the runner's stable ids) seed the
        sampling; without them a row's id is its position in `inputs`."""
        n = len(inputs["text"])
        if not n:
            return self.schema.empty_table(), 0
        ids, limits = self._encode(inputs)
        seeds = None
        if self.engine.sampling:
            seeds = [row_seed(self.options.seed, r) for r in (row_ids or [str(i) for i in range(n)])]
        if self.device == "cpu":
            from hfbatch.tasks.engine.streams import cpu_streams

            outputs = self.engine.generate(ids, limits, batch_tokens, seeds, cpu_streams())
        else:
            with self.lock, self._kernels():  # shards of a thread runner share the model
                outputs = self.engine.generate(ids, limits, batch_tokens, seeds)
        texts = self.tokenizer.batch_decode([tokens for tokens, _ in outputs], skip_special_tokens=True)
        lengths = [len(x) for x in ids]
        table = pa.table({"generated_text": pa.array([t.strip() if self.strip else t for t in texts], pa.string()),
                          "input_tokens": pa.array(lengths, pa.int32()),
                          "output_tokens": pa.array([len(tokens) for tokens, _ in outputs], pa.int32()),
                          "finish_reason": pa.array([reason for _, reason in outputs], pa.string())},
                         schema=self.schema)
        return table, sum(lengths)
