"""Compute only what a first-token classification head reads.

A BERT-style sequence classifier (BERT's pooler, RoBERTa's, ELECTRA's classification heads) reads
the last layer's hidden state at the first position only. In that last layer every token's keys
and values are still needed, but its query, attention output and feed-forward block are needed for
the first token alone: computing them for one token instead of all of them skips about 5/6 of the
layer. The arithmetic per output value is the pipeline's, so logits agree to float rounding.

`first_token_only` wraps the last layer only where the model has that layer structure, and keeps
the wrapper only if a padded probe batch gives the full model's logits; otherwise the model is left
as it was.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROBE_ATOL = 1e-5


class FirstTokenLayer(nn.Module):
    """A BERT-style encoder layer whose output is the first token's hidden state only, (B, 1, H)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer: Any = layer  # a BertLayer-shaped module (its parts are checked before it is wrapped)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        attention, first = self.layer.attention, hidden_states[:, :1]
        heads = attention.self
        batch, length, _ = hidden_states.shape
        size = heads.attention_head_size
        query = heads.query(first).view(batch, 1, -1, size).transpose(1, 2)
        key = heads.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
        value = heads.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] != 1:
            attention_mask = attention_mask[:, :, :1, :]  # the first query's row of a (B, 1, L, L) mask
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=heads.scaling)
        attended = attention.output(context.transpose(1, 2).reshape(batch, 1, -1), first)
        return self.layer.output(self.layer.intermediate(attended), attended)


def encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The layer list of a BERT-style (`encoder.layer`) or DistilBERT-style (`transformer.layer`)
    encoder, else None."""
    base = getattr(model, "base_model", model)
    for path in ("encoder", "transformer"):
        layers = getattr(getattr(base, path, None), "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    return None


def _last_layer_list(model: Any) -> nn.ModuleList | None:
    """The encoder's layer list when the model is a BERT-style encoder with a sequence-classification
    head (the heads that read the first token), else None."""
    if not type(model).__name__.endswith("ForSequenceClassification") or model.config.is_decoder:
        return None
    layers = encoder_layers(model)
    if layers is None:
        return None
    last = layers[-1]
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
             "intermediate", "output")
    if getattr(last, "add_cross_attention", False) or not all(_has(last, p) for p in parts):
        return None
    return layers


def _has(module: Any, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


def _probe(model: Any) -> dict[str, torch.Tensor]:
    """Two rows of different lengths (the shorter one padded), tokens drawn from the vocabulary."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 30_000)
    input_ids = torch.randint(5, vocab, (2, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 13:] = 0
    device = next(model.parameters()).device
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def first_token_only(model: Any) -> bool:
    """Replace the last encoder layer of `model` (fp32, eval mode) by a `FirstTokenLayer` if the model
    is one it applies to and a probe batch keeps its logits; True if it did."""
    layers = _last_layer_list(model)
    if layers is None:
        return False
    original = layers[-1]
    with torch.inference_mode():
        try:
            probe = _probe(model)
            expected = model(**probe).logits
            layers[-1] = FirstTokenLayer(original)
            same = torch.allclose(model(**probe).logits, expected, rtol=0, atol=PROBE_ATOL)
        except Exception:  # a layer this wrapper does not understand: keep the model as it was
            same = False
    if not same:
        layers[-1] = original
    return same
