"""`--precision int8`: dynamic int8 quantization of a model's linear layers, on CPU.

Weights are quantized per output channel once; activations per tensor at every call (torch's
dynamic quantization). The first layer of a BERT-style encoder stays fp32 unless the caller checks
its results another way (text classification scores its close calls again in fp32): its inputs, the
embeddings, are where int8 loses the most (labels changed per layer kept in fp32:
`benchmarks/RESULTS.md`). A model that generates (decoder, encoder-decoder) keeps in fp32 its output head
and the linear layer after each MLP's activation (`MLP_OUTPUTS`): that layer's inputs have outliers a
per-tensor activation scale cannot hold (LLM.int8()'s finding): all int8, a fine-tuned SmolLM2's SST-2
exact match fell from 87.2 to 67.8; with these two kept fp32 it was 85.2, CTranslate2 int8's 85.4
(`benchmarks/RESULTS.md`).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from hfbatch.tasks.engine.first_token import encoder_layers

MLP_OUTPUTS = ("down_proj", "fc2", "wo", "dense_4h_to_h", "w2")
"""Names of the linear layer after an MLP's activation (Llama/Mistral/Qwen, BART/Marian, T5, GPT-NeoX,
Mixtral experts)."""


def fp32_linear_names(model: nn.Module, keep_first_layer: bool = True) -> set[str]:
    """Names of the linear layers `quantize_int8` keeps in fp32: a generating model's output head and MLP
    outputs; else those of the first encoder layer, or none."""
    if getattr(model, "can_generate", lambda: False)():
        head = model.get_output_embeddings()  # type: ignore[operator]  # a transformers model (nn.Module to mypy)
        return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)
                and (m is head or name.rsplit(".", 1)[-1] in MLP_OUTPUTS)}
    layers = encoder_layers(model) if keep_first_layer else None
    kept = {id(m) for m in layers[0].modules()} if layers is not None else set()
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in kept}


def quantize_int8(model: nn.Module, keep_first_layer: bool = True) -> nn.Module:
    """A copy of `model` (fp32, on CPU) with its linear layers int8, except those named by
    `fp32_linear_names`."""
    with warnings.catch_warnings():  # torch.ao's dynamic quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        kept = fp32_linear_names(model, keep_first_layer)
        # per output channel: per-tensor weight scales move MiniLM's embeddings much further
        spec = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name not in kept}
        return quantize_dynamic(model, spec, dtype=torch.qint8)

