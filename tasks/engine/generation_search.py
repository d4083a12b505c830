"""How the next token of each sequence is chosen: what `model.generate` does with a generation config
(its logits processors, then greedy search, sampling or beam search), for a batch whose sequences are
at different steps and came from different prompts (continuous batching, `generation_batch.py`).

`generate` builds its logits processors for a batch whose rows share one prompt length and one step.
Here each processor runs in the way that keeps every row's result what `generate` gives for that row
alone: the ones that look at neither the tokens nor the step run on the whole batch (temperature,
top-k, top-p, suppressed tokens, single-token bad words, ...); the ones that depend only on the step
(minimum length, forced first and last tokens, suppression at the start) are computed here per row,
from its own step and limits; the others (repetition penalty, no-repeat n-grams, multi-token bad words,
sequence bias, encoder-side penalties) are `generate`'s own objects, built for each row alone and
called on its own tokens. Beam search is `generate`'s vectorized algorithm (transformers 5) with each
row's step, limit and length penalty its own.

Sampling draws from one `torch.Generator` per row (its seed comes from the run seed and the row id), as
`generate` draws from torch's global one: a row's text does not depend on what else is in the batch.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation import logits_process as lp

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.engine.transformers_api import logits_processors, prepared_config, special_tokens

if TYPE_CHECKING:
    from hfbatch.tasks.engine.constraints import Guide
    from hfbatch.tasks.engine.generation_batch import Batch

BATCHED = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
           lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper, lp.TopHLogitsWarper,
           lp.SuppressTokensLogitsProcessor, lp.InfNanRemoveLogitsProcessor, lp.LogitNormalization)
"""Processors that read neither the tokens so far nor the step: one call for the whole batch."""
BY_STEP = (lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor, lp.ForcedBOSTokenLogitsProcessor,
           lp.ForcedEOSTokenLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor)
"""Processors that read only the step: computed here from each row's own step."""
REFUSED = (lp.UnbatchedClassifierFreeGuidanceLogitsProcessor, lp.ClassifierFreeGuidanceLogitsProcessor,
           lp.WatermarkLogitsProcessor, lp.SynthIDTextWatermarkLogitsProcessor)
MODES = ("greedy_search", "sample", "beam_search", "beam_sample")
UNSUPPORTED = {"stop_strings": None, "max_time": None, "guidance_scale": (None, 1, 1.0), "watermarking_config": None,
               "constraints": None, "force_words_ids": None}


class Decoding:
    """A generation config as per-row rules: end tokens, search, length limits and processors.

    `config` is a copy of the model's generation config with the run's options (`generate`'s
    `generation_config` argument); the model's own config and transformers' defaults fill what it
    leaves unset, as in `generate`."""

    def __init__(self, model, config, device, guide: Guide | None = None):
        config = prepared_config(model, config, device)
        config.num_return_sequences = 1  # one text per row: the best beam, or one sample
        mode = config.get_generation_mode()
        mode = getattr(mode, "value", mode)
        if mode not in MODES:
            raise ConfigError(f"generation mode {mode!r} (from the model's generation config and the options) is not "
                              f"supported; hfbatch generates with {', '.join(MODES)}")
        for name, allowed in UNSUPPORTED.items():
            value = getattr(config, name, None)
            if value is not None and (allowed is None or value not in allowed):
                raise ConfigError(f"the generation config sets {name}={value!r}, which hfbatch does not support")
        self.config = config
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        eos, pad, start = special_tokens(config)
        self.eos = (eos if eos is not None else torch.zeros(0, dtype=torch.long)).to(device).reshape(-1)
        self.pad = int(pad) if pad is not None else 0
        self.start = int(start.reshape(-1)[0]) if start is not None else None
        self.sample = bool(config.do_sample)
        self.beams = int(config.num_beams or 1)
        self.length_penalty = float(config.length_penalty)
        self.early_stopping = config.early_stopping
        self.min_new = config.min_new_tokens
        self.forced_bos = config.forced_bos_token_id
        self.forced_eos = None if config.forced_eos_token_id is None else \
            torch.tensor(config.forced_eos_token_id, device=device).reshape(-1)
        self.begin_suppress = None if config.begin_suppress_tokens is None else \
            torch.tensor(config.begin_suppress_tokens, device=device).reshape(-1)
        self.model, self.device, self.guide = model, device, guide
        if guide is not None and self.beams > 1:
            raise ConfigError("a constraint (--choices, --regex, --json-schema, --grammar) decodes greedily or by "
                              "sampling, not with beam search: drop --num-beams")
        single_bad_words = all(len(w) == 1 for w in (config.bad_words_ids or ()))
        self.steps: list[tuple[str, Any]] = []
        for p in self._processors(prompt_len=1 if self.encoder_decoder else 2, encoder_ids=torch.ones(1, 1).long()):
            if isinstance(p, REFUSED):
                raise ConfigError(f"the generation config asks for {type(p).__name__}, which hfbatch does not support")
            if isinstance(p, BATCHED) or (type(p) is lp.NoBadWordsLogitsProcessor and single_bad_words):
                self.steps.append(("batch", p))
            elif isinstance(p, BY_STEP):
                self.steps.append(("step", type(p)))
            else:
                self.steps.append(("row", None))
        self.per_row = any(kind == "row" for kind, _ in self.steps)

    def _processors(self, prompt_len: int, encoder_ids: torch.Tensor):
        """`generate`'s processors for one row: `prompt_len` decoder input tokens (1, the start token, for
        an encoder-decoder), `encoder_ids` its encoder input."""
        config = self.config
        if config.min_new_tokens is not None:  # as `generate` sets it (`_prepare_generated_length`)
            config = copy.deepcopy(config)
            config.min_length = config.min_new_tokens + prompt_len
        return logits_processors(self.model, config, prompt_len,
                                 encoder_ids.to(self.device) if self.encoder_decoder else None, self.device)

    def row_processors(self, prompt_len: int, encoder_ids: torch.Tensor) -> list | None:
        """The processors that must see this row's own tokens, built for it alone (None: there are none)."""
        if not self.per_row:
            return None
        built = self._processors(prompt_len, encoder_ids)
        return [p if kind == "row" else None for (kind, _), p in zip(self.steps, built)]

    def min_length(self, prompt_len: int) -> int:
        """The least decoder length (prompt included) before an end token may come, for one row."""
        if self.min_new is not None:
            return self.min_new + prompt_len
        return int(self.config.min_length or 0)

    # --- logits processing ----------------------------------------------------------------------------
    def process(self, scores: torch.Tensor, b: Batch) -> torch.Tensor:
        """`generate`'s logits processors, in its order, on each sequence's scores."""
        for k, (kind, p) in enumerate(self.steps):
            if kind == "batch":
                scores = p(b.last[:, None], scores)
            elif kind == "step":
                scores = self._by_step(p, scores, b)
            else:
                rows = []
                for i in range(scores.shape[0]):
                    proc = b.rows[i // b.beams].processors[k]
                    rows.append(proc(b.history(i), scores[i: i + 1]))
                scores = torch.cat(rows)
        return scores

    def _by_step(self, kind, scores: torch.Tensor, b: Batch) -> torch.Tensor:
        """A step-dependent processor, each row at its own step; the same values as `generate`'s, written
        in place (`scores` is this step's own tensor) and only where they change."""
        cur = b.prompt + b.n  # each sequence's decoder length (`input_ids.shape[-1]` in `generate`)
        if kind is lp.MinLengthLogitsProcessor or kind is lp.MinNewTokensLengthLogitsProcessor:
            rows, columns = (cur < b.min_len if kind is lp.MinLengthLogitsProcessor else b.n < self.min_new), self.eos
        elif kind is lp.SuppressTokensAtBeginLogitsProcessor:
            begin = b.prompt + ((b.prompt <= 1) & (self.forced_bos is not None)).long()
            rows, columns = cur == begin, self.begin_suppress
        else:
            if kind is lp.ForcedBOSTokenLogitsProcessor:
                rows, keep = cur == 1, torch.tensor([self.forced_bos], device=scores.device)
            else:  # ForcedEOS: the last token a row may generate
                assert self.forced_eos is not None
                rows, keep = b.n == b.limit - 1, self.forced_eos
            if bool(rows.any()):
                forced = torch.nonzero(rows).reshape(-1)
                only = torch.full((len(forced), scores.shape[-1]), -math.inf, dtype=scores.dtype,
                                  device=scores.device)
                only[:, keep] = 0
                scores[forced] = only
            return scores
        columns = columns[columns < scores.shape[-1]]
        if len(columns) and bool(rows.any()):
            scores[:, columns] = torch.where(rows[:, None], -math.inf, scores[:, columns])
        return scores

    # --- token choice ---------------------------------------------------------------------------------
    def choose(self, logits: torch.Tensor, b: Batch) -> torch.Tensor:
        """Greedy search or sampling: each sequence's next token, written into `b`; returns which rows
        ended (an end token, or their limit). A constraint masks the logits first (as vLLM applies its
        grammar's bitmask before sampling) and its matchers take the chosen tokens."""
        if self.guide is not None:
            self.guide.mask(logits, [row.matcher for row in b.rows])
        scores = self.process(logits, b)
        if self.sample:
            probs = torch.softmax(scores, dim=-1)
            tokens = torch.cat([torch.multinomial(probs[i: i + 1], 1, generator=row.generator)[0]
                                for i, row in enumerate(b.rows)])
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.guide is not None:
            self.guide.advance([row.matcher for row in b.rows], tokens.tolist())
        b.gen.scatter_(1, b.n[:, None], tokens[:, None])
        b.last, b.n = tokens, b.n + 1
        return torch.isin(tokens, self.eos) | (b.n >= b.limit)

    def choose_beams(self, logits: torch.Tensor, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of `generate`'s beam search (`_beam_search`) for every row of `b`, each at its own
        step: updates the running and finished beams in `b`; returns the source sequence of each new
        running beam (to reorder the cache by) and which rows ended."""
        nb, vocab = self.beams, logits.shape[-1]
        rows = logits.shape[0] // nb
        log_probs = self.process(torch.log_softmax(logits, dim=-1), b)
        log_probs = (log_probs.view(rows, nb, vocab) + b.score.view(rows, nb, 1)).reshape(rows, nb * vocab)
        keep = max(2, 1 + self.eos.shape[0]) * nb
        if self.sample:
            picks = [torch.multinomial(torch.softmax(log_probs[r: r + 1], dim=-1), keep, generator=row.generator)
                     for r, row in enumerate(b.rows)]
            top_idx = torch.cat(picks)
            top_lp = torch.gather(log_probs, 1, top_idx)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            top_idx = top_idx.gather(-1, order)
        else:
            top_lp, top_idx = torch.topk(log_probs, k=keep)
        beam, token = top_idx // vocab, top_idx % vocab
        n = b.n.view(rows, nb)[:, 0]
        limit = b.limit.view(rows, nb)[:, 0]
        width = b.gen.shape[1]
        candidates = torch.take_along_dim(b.gen.view(rows, nb, width), beam[..., None], dim=1)
        candidates.scatter_(2, n.view(rows, 1, 1).expand(rows, keep, 1), token[..., None])
        hits = torch.isin(token, self.eos) | (n + 1 >= limit)[:, None]

        # the best `nb` candidates that did not end keep running
        running_lp = top_lp + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(running_lp, k=nb)[1]
        b.score = torch.gather(running_lp, 1, nxt).reshape(-1)
        b.gen = torch.take_along_dim(candidates, nxt[..., None], dim=1).reshape(rows * nb, width)
        source = (torch.gather(beam, 1, nxt) + torch.arange(rows, device=beam.device)[:, None] * nb).reshape(-1)
        b.last = torch.gather(token, 1, nxt).reshape(-1)

        # the candidates among the top `nb` that ended join the finished beams if they score better
        finished = b.fin_done.view(rows, nb)
        heuristic = b.heuristic.view(rows, nb)[:, :1]
        just = hits & (torch.arange(keep, device=hits.device) < nb)[None, :]
        penalty = ((n + 1).double() ** self.length_penalty).to(torch.float32)[:, None]
        scores = top_lp / penalty
        all_done = finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        scores = scores + all_done.to(torch.float32) * -1.0e9
        scores = scores + (~heuristic).to(torch.float32) * -1.0e9
        scores = scores + (~just) * -1.0e9
        merged = torch.cat((b.fin_score.view(rows, nb), scores), dim=1)
        best = torch.topk(merged, k=nb)[1]
        b.fin_score = torch.gather(merged, 1, best).reshape(-1)
        b.fin_gen = torch.take_along_dim(torch.cat((b.fin_gen.view(rows, nb, width), candidates), dim=1),
                                         best[..., None], dim=1).reshape(rows * nb, width)
        lengths = torch.cat((b.fin_len.view(rows, nb), (n + 1)[:, None].expand(rows, keep)), dim=1)
        b.fin_len = torch.gather(lengths, 1, best).reshape(-1)
        b.fin_done = torch.gather(torch.cat((finished, just), dim=1), 1, best).reshape(-1)
        b.n = b.n + 1

        # can the running beams still beat the finished ones (`_check_early_stop_heuristic`)?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            hypothetical = limit
        else:
            hypothetical = n + 1
        divisor = (hypothetical.double() ** self.length_penalty).to(torch.float32)[:, None]
        best_running = b.score.view(rows, nb)[:, :1] / divisor
        fin_scores, fin_done = b.fin_score.view(rows, nb), b.fin_done.view(rows, nb)
        worst = torch.where(fin_done, torch.min(fin_scores, dim=1, keepdim=True)[0], -1.0e9)
        heuristic = heuristic & torch.any(best_running > worst, dim=-1, keepdim=True)
        b.heuristic = heuristic.expand(rows, nb).reshape(-1)
        open_beams = ~(fin_done.all(dim=-1) & (self.early_stopping is True))
        ended = ~(heuristic[:, 0] & open_beams & ~hits.all(dim=-1))
        return source, ended

    def result(self, b: Batch, row: int) -> tuple[list[int], str]:
        """A finished row's new tokens (to and with its end token) and why it stopped: `eos`, or `length`
        when it reached its limit (also where the config forces an end token there)."""
        if self.beams > 1:
            i = row * self.beams  # the best finished beam comes first
            tokens = b.fin_gen[i, : int(b.fin_len[i])].tolist()
        else:
            tokens = b.gen[row, : int(b.n[row])].tolist()
        limit = int(b.limit[row * self.beams])
        ended = bool(tokens) and bool(torch.isin(torch.tensor(tokens[-1:], device=self.eos.device), self.eos).any())
        if not ended or (self.forced_eos is not None and len(tokens) >= limit):
            return tokens, "length"
        return tokens, "eos"
