"""The generation engine behind translation, summarization, text2text-generation and text-generation
(their predictor base: `generation.py`).

Each row gets the tokens `model.generate` would give it alone with the same generation config (the
model's `generation_config.json`, then the run's options): greedy search and beam search exactly, sampling
from the row's own `torch.Generator`, seeded from the run's seed and the row's id, so that a row's text
depends on neither the batch, the shard, the thread count nor a rerun.

How it is fast: the rows are sorted by cost (input tokens + tokens they may generate, the longest first)
and decoded with a key/value cache in lanes, one per CPU stream (`streams.py`, each lane on one thread)
or one on a GPU. A lane holds as many sequences as its token budget allows, counting the tokens still to
be generated; a row leaves as soon as it ends and, when a quarter of the budget is free, the next rows
are prefilled together and join the running batch (continuous batching, `generation_batch.py`), so no
step is spent on a finished row or on padding to the longest output of a fixed batch. The first tokens
all prompts share (a chat template's system prompt, a prompt template's text) are computed once and their
keys and values copied into each prefill (prefix caching). Choosing tokens (`generation_search.py`) and
decoding the texts are done for the whole batch at once.
"""
from __future__ import annotations

import copy
import logging
import threading

import torch

from hfbatch.tasks.engine.generation_batch import Prefix, Row, Stepper, joinable
from hfbatch.tasks.engine.generation_search import Decoding

log = logging.getLogger(__name__)

ADMIT_WHEN_FREE = 0.25
"""New rows join a lane once this share of its token budget is free, that share of the budget at a time:
a prefill is a forward pass of its own, worth doing for several rows at once, and lanes that take the
queue's rows a few at a time end together."""


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
    """Generates for many rows at once with one model and one generation config. `share_prefix`: compute
    the first tokens all prompts of a call share once (`generation_batch.Prefix`); off only to measure it."""

    def __init__(self, model, config, device: str, continuous: bool | None = None, guide=None,
                 share_prefix: bool = True):
        self.device, self.share_prefix = device, share_prefix
        self.decoding = Decoding(model, copy.deepcopy(config), device, guide)
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
            prefix = self.stepper.shared_prefix([r.ids for r in rows]) if self.share_prefix else None
            if streams is None or streams.count <= 1:
                lanes = [self._lane(queue, budget, prefix)]
            else:
                lanes = streams.map(lambda _: self._lane(queue, budget, prefix),
                                    range(min(streams.count, len(rows))))
        results: list = [None] * len(rows)
        for lane in lanes:
            for index, tokens, reason in lane:
                results[index] = (tokens, reason)
        return results

    def _lane(self, queue: _Queue, budget: int, prefix: Prefix | None) -> list[tuple[int, list[int], str]]:
        done: list[tuple[int, list[int], str]] = []
        batch, continuous = None, self.stepper.continuous
        with torch.inference_mode():
            while True:
                if batch is None or (continuous and batch.cost() <= (1 - ADMIT_WHEN_FREE) * budget):
                    group = queue.take(batch, budget, self.decoding.beams,
                                       int(ADMIT_WHEN_FREE * budget) if continuous else None)
                    if group:
                        new, logits = self.stepper.prefill(group, prefix)
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
        flags = ended.tolist()
        for r, end in enumerate(flags):
            if end:
                done.append((batch.rows[r].index, *d.result(batch, r)))
        batch.keep(source, [r for r, end in enumerate(flags) if not end])
