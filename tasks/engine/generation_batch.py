"""The sequences one lane of the generation engine decodes together, and the model calls that advance them.

A `Batch` holds its sequences' key/value cache (transformers' own `Cache`, one step appended per
forward pass), their attention masks and positions, the tokens generated so far and, for beam search,
the finished beams. Rows leave it as soon as they end; with continuous batching new rows join it:
they are prefilled on their own (the encoder and the first decoder step, or the prompt) and their
cache is then joined to the running one, the decoder's self-attention states padded on the left and
masked, the encoder's on the right. A sequence's positions stay its own: decoder-only models take
`position_ids`; encoder-decoders with absolute decoder positions get theirs from a hook on the decoder's
position embedding (`PositionHook`), and T5's relative positions do not change with left padding.
Models where neither holds decode in cohorts: new rows wait until the lane is empty, as in one call of
`generate`, and only leave early.

Prompts that start alike (a chat template's system prompt, a prompt template's fixed text) share a
`Prefix`: its keys and values are computed once, copied into every prefill's cache, and only the rest
of each prompt goes through the model (automatic prefix caching, as vLLM's, for the prefix all the rows
of a call share). The rest is padded on the left, after the prefix: the mask hides the gap.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

RELATIVE_POSITIONS = ("t5", "mt5", "umt5")
"""Encoder-decoders whose decoder attention depends on relative positions only."""
PER_SEQUENCE = ("pos", "last", "n", "limit", "prompt", "min_len", "score", "fin_score", "fin_len", "fin_done",
                "heuristic")
TOKENS = ("gen", "fin_gen")


@dataclass
class Row:
    """One input row while it is decoded."""

    index: int
    """Its place in the engine's requests (where its result goes)."""
    ids: list[int]
    """Encoder input (encoder-decoder) or prompt (decoder-only) token ids."""
    limit: int
    """New tokens it may generate."""
    cost: int
    """Tokens it may hold in the cache per sequence: its input and its limit."""
    generator: torch.Generator | None = None
    processors: Any = None
    matcher: Any = None
    """Its constraint's matcher (`constraints.Guide`), if the run has a constraint."""
    prefix: Any = None
    """Decoder input before its new tokens (the start token, or the prompt), for per-row processors."""


@dataclass
class Prefix:
    """The first tokens of every prompt of a call, and their keys and values (one sequence per layer)."""

    length: int
    states: list[tuple[torch.Tensor, torch.Tensor]]


def common_length(prompts: list[list[int]]) -> int:
    """How many first tokens all `prompts` share, short of the shortest prompt's last token (each prompt's
    prefill must still compute the logits of its first new token)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
        if n <= 0:
            return 0
    return n


class PositionHook:
    """Gives each sequence its own position in the decoder's absolute position embedding (an
    `nn.Embedding` of positions, e.g. Marian's, BART's, Pegasus'), where the model would give every
    sequence the cache length. Checked against the module itself before use: `None` if it does not fit."""

    def __init__(self, module, offset: int):
        self.module, self.offset = module, offset
        self.local = threading.local()  # the lanes of the engine are threads sharing the model
        module.register_forward_hook(self._hook)

    @classmethod
    def install(cls, model) -> PositionHook | None:
        """The hook of `model`'s decoder position embedding (one per module), or None where it does not fit."""
        embed: Any = getattr(model.get_decoder(), "embed_positions", None)
        if not isinstance(embed, torch.nn.Embedding):
            return None
        found = getattr(embed, "_hfbatch_positions", None)
        if isinstance(found, cls):
            return found
        weight = embed.weight.detach()
        with torch.inference_mode():
            for first in (torch.Size([1, 1]), torch.zeros(1, 1, dtype=torch.long, device=weight.device)):
                try:
                    at = [embed(first, c).reshape(-1) for c in (0, 3, 7)]
                    break
                except (TypeError, ValueError, AttributeError, RuntimeError):
                    continue
            else:
                return None
            matches = torch.nonzero((weight == at[0]).all(dim=1)).reshape(-1).tolist()
            for offset in matches:
                if all(offset + c < weight.shape[0] and torch.equal(weight[offset + c], v)
                       for c, v in zip((3, 7), at[1:])):
                    hook = cls(embed, offset)
                    setattr(embed, "_hfbatch_positions", hook)  # noqa: B010 - not a torch attribute
                    return hook
        return None

    def _hook(self, module, args, output):
        positions = getattr(self.local, "positions", None)
        if positions is None:
            return output
        return F.embedding(positions[:, None] + self.offset, module.weight)

    def __call__(self, positions: torch.Tensor | None):
        self.local.positions = positions


class GrowingLayer(DynamicLayer):
    """A dynamic cache layer that writes each new step into spare room at the end of its buffer, where
    transformers' `DynamicLayer` concatenates (copies the whole cache every step); the room grows by a
    quarter when full. Its `keys` and `values` are views of the buffer; a caller that replaces them (a
    merge) has them copied into a new buffer at the next update."""

    _k: Any
    _v: Any
    keys: Any
    values: Any

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._start = self._end = 0

    def _views(self) -> None:
        self.keys = self._k[:, :, self._start: self._end]
        self.values = self._v[:, :, self._start: self._end]
        self._seen = (self.keys, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        adopted = self._k is not None and self._seen[0] is self.keys and self._seen[1] is self.values
        used = self.keys.shape[-2] if self.keys.numel() else 0
        if not adopted or self._end + new > self._k.shape[-2]:
            room = used + new + max(32, used // 4)
            shape = (key_states.shape[0], key_states.shape[1], room, key_states.shape[-1])
            k = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
            v = torch.empty(shape[:-1] + (value_states.shape[-1],), dtype=value_states.dtype,
                            device=value_states.device)
            if used:
                k[:, :, :used], v[:, :, :used] = self.keys, self.values
            self._k, self._v, self._start, self._end = k, v, 0, used
        self._k[:, :, self._end: self._end + new] = key_states
        self._v[:, :, self._end: self._end + new] = value_states
        self._end += new
        self._views()
        return self.keys, self.values

    def drop_front(self, n: int) -> None:
        """Forget the first `n` positions (left padding no sequence uses any more), without a copy."""
        if self._k is not None and self._seen[0] is self.keys:
            self._start += n
            self._views()
        else:
            self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        if self._k is not None and self._seen[0] is self.keys:
            self._k, self._v = self._k.index_select(0, beam_idx), self._v.index_select(0, beam_idx)
            self._views()
        else:
            super().reorder_cache(beam_idx)  # type: ignore[arg-type]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices, device=self.keys.device).reshape(-1))


def _layers(cache) -> tuple[list, list]:
    """The self-attention and cross-attention layers of a cache."""
    if isinstance(cache, EncoderDecoderCache):
        return cache.self_attention_cache.layers, cache.cross_attention_cache.layers
    return cache.layers, []


def joinable(cache) -> bool:
    """Whether rows can join this cache: plain dynamic layers (no sliding window, no quantization)."""
    selfs, crosses = _layers(cache)
    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in [*selfs, *crosses])


def _pad(t: torch.Tensor, dim: int, size: int, left: bool, value=0) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    fill = torch.full(shape, value, dtype=t.dtype, device=t.device)
    return torch.cat([fill, t] if left else [t, fill], dim=dim)


class Batch:
    """Sequences decoded together: `beams` per row, row after row. Per sequence: its position, last
    token, tokens generated (`n`, `gen`), limit, prompt and least length, its beam score, and the best
    finished beam (`fin_*`) with whether the beam search may still better it (`heuristic`)."""

    pos: torch.Tensor
    last: torch.Tensor
    n: torch.Tensor
    limit: torch.Tensor
    prompt: torch.Tensor
    min_len: torch.Tensor
    score: torch.Tensor
    fin_score: torch.Tensor
    fin_len: torch.Tensor
    fin_done: torch.Tensor
    heuristic: torch.Tensor
    gen: torch.Tensor
    fin_gen: torch.Tensor
    enc: Any
    enc_mask: Any
    """The encoder's states and mask (encoder-decoders), else None."""

    def __init__(self, rows: list[Row], beams: int, cache, mask: torch.Tensor, fields: dict, pad: int):
        self.rows, self.beams, self.cache, self.mask, self.pad = rows, beams, cache, mask, pad
        self.enc = self.enc_mask = None
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def size(self) -> int:
        return len(self.rows) * self.beams

    def cost(self) -> int:
        """Padded tokens it may come to hold: sequences x the largest row's input + limit."""
        return self.size * max((r.cost for r in self.rows), default=0)

    def history(self, i: int) -> torch.Tensor:
        """Sequence `i`'s decoder input so far, as `generate` would pass it to a logits processor."""
        row = self.rows[i // self.beams]
        return torch.cat([row.prefix, self.gen[i, : int(self.n[i])]])[None]

    def keep(self, cache_index: torch.Tensor | None, rows: list[int]) -> None:
        """Keep the sequences of `rows`; the cache follows `cache_index` (the beams' sources), if given."""
        seqs = torch.tensor([r * self.beams + b for r in rows for b in range(self.beams)], dtype=torch.long,
                            device=self.mask.device)
        if cache_index is not None:
            self.cache.reorder_cache(cache_index[seqs])
        elif len(rows) < len(self.rows):
            self.cache.reorder_cache(seqs)
        if len(rows) < len(self.rows):
            for name in (*PER_SEQUENCE, *TOKENS, "mask", "enc", "enc_mask"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value[seqs])
            self.rows = [self.rows[r] for r in rows]

    def trim(self) -> None:
        """Drop the cache columns that no sequence uses any more: the left padding of the decoder
        states, the right padding of the encoder states."""
        if not self.rows:
            return
        lead = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        selfs, crosses = _layers(self.cache)
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in selfs:
                if isinstance(layer, GrowingLayer):
                    layer.drop_front(lead)
                else:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        if self.enc_mask is not None:
            width = int(self.enc_mask.sum(dim=1).max())
            if width < self.enc_mask.shape[1]:
                self.enc, self.enc_mask = self.enc[:, :width], self.enc_mask[:, :width]
                for layer in crosses:
                    layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def merge(self, other: Batch) -> Batch:
        """This batch with `other`'s sequences after its own (decoder states left-padded to the longer,
        encoder states right-padded)."""
        if not self.rows:
            return other
        if not other.rows:
            return self
        length = max(self.mask.shape[1], other.mask.shape[1])
        (selfs, crosses), (o_selfs, o_crosses) = _layers(self.cache), _layers(other.cache)
        for a, b in zip(selfs, o_selfs):
            a.keys = torch.cat([_pad(a.keys, 2, length, True), _pad(b.keys, 2, length, True)])
            a.values = torch.cat([_pad(a.values, 2, length, True), _pad(b.values, 2, length, True)])
        self.mask = torch.cat([_pad(self.mask, 1, length, True), _pad(other.mask, 1, length, True)])
        if self.enc is not None:
            width = max(self.enc.shape[1], other.enc.shape[1])
            for a, b in zip(crosses, o_crosses):
                a.keys = torch.cat([_pad(a.keys, 2, width, False), _pad(b.keys, 2, width, False)])
                a.values = torch.cat([_pad(a.values, 2, width, False), _pad(b.values, 2, width, False)])
            self.enc = torch.cat([_pad(self.enc, 1, width, False), _pad(other.enc, 1, width, False)])
            self.enc_mask = torch.cat([_pad(self.enc_mask, 1, width, False), _pad(other.enc_mask, 1, width, False)])
        width = max(self.gen.shape[1], other.gen.shape[1])
        for name in TOKENS:
            setattr(self, name, torch.cat([_pad(getattr(self, name), 1, width, False, self.pad),
                                           _pad(getattr(other, name), 1, width, False, self.pad)]))
        for name in PER_SEQUENCE:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.rows = self.rows + other.rows
        return self


class Stepper:
    """The model calls of the engine: prefill new rows, advance a batch by one token."""

    def __init__(self, model, decoding, device, continuous: bool | None = None):
        import inspect

        self.model, self.decoding, self.device = model, decoding, device
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        params = inspect.signature(model.forward).parameters
        self.position_ids = "position_ids" in params
        self.logits_to_keep = "logits_to_keep" in params
        self.hook = PositionHook.install(model) if self.encoder_decoder else None
        if self.encoder_decoder:
            supported = self.hook is not None or model.config.model_type in RELATIVE_POSITIONS
        else:
            supported = self.position_ids
        self.continuous = supported if continuous is None else continuous and supported
        """Whether rows join running batches; else they decode in cohorts."""
        self.growing = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
        """Whether the model's own cache would be plain dynamic layers (no sliding window...): then the
        decoder self-attention layers are `GrowingLayer`s."""

    def _cache(self):
        """An empty cache for a prefill, or None: the model makes its own."""
        if not self.growing:
            return None
        growing = DynamicCache()
        growing.layer_class_to_replicate = GrowingLayer
        return EncoderDecoderCache(growing, DynamicCache()) if self.encoder_decoder else growing

    def shared_prefix(self, prompts: list[list[int]]) -> Prefix | None:
        """The prefix all `prompts` share, its keys and values computed, where this model's prefills can
        start from it (decoder-only, per-sequence positions, plain dynamic cache); else None."""
        if self.encoder_decoder or not (self.position_ids and self.growing) or len(prompts) < 2:
            return None
        n = common_length(prompts)
        if n < 1:
            return None
        kwargs = {"input_ids": torch.tensor([prompts[0][:n]], dtype=torch.long, device=self.device),
                  "cache": self._cache(), "use_cache": True}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return Prefix(n, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])

    def prefill(self, rows: list[Row], prefix: Prefix | None = None) -> tuple[Batch, torch.Tensor]:
        """A batch of new rows after their first forward pass, and the logits of their first token; the rows'
        prompts start with `prefix`, if given, whose states are copied instead of computed."""
        d, k, beams = self.decoding, len(rows), self.decoding.beams
        skip = prefix.length if prefix is not None else 0
        width = max(len(r.ids) for r in rows) - skip
        ids = torch.full((k, width), d.pad, dtype=torch.long)
        mask = torch.zeros((k, width), dtype=torch.long)
        left = not self.encoder_decoder  # decoder-only prompts end where generation starts
        for j, r in enumerate(rows):
            n = len(r.ids) - skip
            span = slice(width - n, width) if left else slice(0, n)
            ids[j, span], mask[j, span] = torch.tensor(r.ids[skip:], dtype=torch.long), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = self._cache()
        if prefix is not None:
            for i, (keys, values) in enumerate(prefix.states):
                cache.update(keys.expand(k, -1, -1, -1), values.expand(k, -1, -1, -1), i)
            mask = torch.cat([torch.ones((k, skip), dtype=torch.long, device=self.device), mask], dim=1)
        pos: Any  # each sequence's next position: one for all (encoder-decoders) or one per sequence
        prompt: Any
        if self.encoder_decoder:
            enc = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            start = torch.full((k, 1), d.start, dtype=torch.long, device=self.device)
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask,
                             decoder_input_ids=start, cache=cache, use_cache=True)
            dec_mask, pos, prompt = torch.ones((k, 1), dtype=torch.long, device=self.device), 1, 1
        else:
            kwargs = {"input_ids": ids, "attention_mask": mask, "cache": cache, "use_cache": True}
            if self.position_ids:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, skip:]
            if self.logits_to_keep:
                kwargs["logits_to_keep"] = 1
            out = self.model(**kwargs)
            dec_mask, pos, prompt = mask, mask.sum(dim=1), mask.sum(dim=1)
        logits = out.logits[:, -1].to(dtype=torch.float32)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        for r in rows:
            r.prefix = torch.tensor([d.start] if self.encoder_decoder else r.ids, dtype=torch.long, device=self.device)
            r.processors = d.row_processors(len(r.prefix), torch.tensor([r.ids]))
            r.matcher = d.guide.matcher() if d.guide is not None else None
        batch = self._batch(rows, cache, dec_mask, pos, prompt)
        if self.encoder_decoder:
            batch.enc, batch.enc_mask = enc, mask
        if beams > 1:  # every beam starts from the row's prompt (as `generate` expands its inputs)
            expand = torch.arange(k, device=self.device).repeat_interleave(beams)
            batch.cache.reorder_cache(expand)
            batch.mask, logits = batch.mask[expand], logits[expand]
            if batch.enc is not None:
                batch.enc, batch.enc_mask = batch.enc[expand], batch.enc_mask[expand]
        return batch, logits

    def _batch(self, rows: list[Row], cache, mask: torch.Tensor, pos, prompt) -> Batch:
        d, beams, dev = self.decoding, self.decoding.beams, self.device
        n = len(rows) * beams

        def per_seq(values) -> torch.Tensor:  # one value per row (or one for all) -> one per sequence
            t = torch.as_tensor(values, dtype=torch.long, device=dev)
            return (t.expand(len(rows)) if t.dim() == 0 else t).repeat_interleave(beams)

        prompts = per_seq(prompt)
        width = max(r.limit for r in rows)
        score = torch.zeros(len(rows), beams, device=dev)
        score[:, 1:] = -1e9  # the first step looks at one beam only (its copies are alike)
        fields = {"pos": per_seq(pos), "last": torch.full((n,), d.pad, dtype=torch.long, device=dev),
                  "n": torch.zeros(n, dtype=torch.long, device=dev),
                  "limit": per_seq([r.limit for r in rows]), "prompt": prompts,
                  "min_len": torch.tensor([d.min_length(int(p)) for p in prompts.tolist()], dtype=torch.long,
                                          device=dev),
                  "gen": torch.full((n, width), d.pad, dtype=torch.long, device=dev),
                  "score": score.reshape(-1), "fin_score": torch.full((n,), -1e9, device=dev),
                  "fin_len": torch.zeros(n, dtype=torch.long, device=dev),
                  "fin_done": torch.zeros(n, dtype=torch.bool, device=dev),
                  "fin_gen": torch.full((n, width), d.pad, dtype=torch.long, device=dev),
                  "heuristic": torch.ones(n, dtype=torch.bool, device=dev)}
        return Batch(rows, beams, cache, mask, fields, d.pad)

    def step(self, b: Batch) -> torch.Tensor:
        """One forward pass: every sequence's last token in, the logits of its next one out."""
        ones = torch.ones((b.mask.shape[0], 1), dtype=b.mask.dtype, device=b.mask.device)
        b.mask = torch.cat([b.mask, ones], dim=1)
        if self.encoder_decoder:
            kwargs = {"encoder_outputs": BaseModelOutput(last_hidden_state=b.enc), "attention_mask": b.enc_mask,
                      "decoder_input_ids": b.last[:, None], "cache": b.cache, "use_cache": True}
            if self.continuous:
                kwargs["decoder_attention_mask"] = b.mask
            if self.hook is not None:
                self.hook(b.pos)
            try:
                out = self.model(**kwargs)
            finally:
                if self.hook is not None:
                    self.hook(None)
        else:
            kwargs = {"input_ids": b.last[:, None], "attention_mask": b.mask, "cache": b.cache, "use_cache": True}
            if self.position_ids:
                kwargs["position_ids"] = b.pos[:, None]
            out = self.model(**kwargs)
        b.pos = b.pos + 1
        return out.logits[:, -1].to(dtype=torch.float32)
