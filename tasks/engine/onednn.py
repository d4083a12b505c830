"""CPU fp32 inference on oneDNN's packed weights.

On a CPU, `nn.Linear` calls a BLAS sgemm with the weight as it is stored, and the BLAS repacks the
weight's panels at every call. oneDNN can reorder a weight once into the blocked layout its kernels read
(what torch.compile's CPU freezing does) and run every later call on it. Measured on one thread of the
2-core AVX-512 EPYC (`benchmarks/RESULTS.md`): 1.1-1.5x the sgemm's speed for MiniLM's layer shapes and
1.1-1.65x for Marian's at 16 rows or more, 1.7-2.4x for a 30k-token LM head at decoding batch sizes
(there the weight's memory traffic is the limit). Results differ from the sgemm's by rounding only
(at most 1e-5 in those measurements; outputs checked equal in the tests and benchmarks). Below
`MIN_ROWS` rows (one sequence's decoding step) sgemm is faster and runs instead. The packed copy
doubles the memory of the linear weights. `HFBATCH_CPU_KERNELS=aten` turns it off. The primitive
caches it fills are capped by `cpu.tune_cpu`.

`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise` are the ops torch.compile's CPU
freezing emits; torch has no public API for a prepacked linear layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16
"""Inputs of fewer rows (tokens across the batch) run on torch's own kernel."""

def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedForward:
    """The forward of one `nn.Linear` on its weight reordered once for oneDNN."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.dim() < 2 or x.numel() < MIN_ROWS * x.shape[-1] or x.dtype != torch.float32 or \
                (torch.is_grad_enabled() and (x.requires_grad or m.weight.requires_grad)):
            return F.linear(x, m.weight, m.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, m.bias, "none", [], "")


def pack_linear_layers(model: nn.Module) -> int:
    """Run `model`'s fp32 CPU linear layers (exactly `nn.Linear`: not quantized ones) on packed weights,
    for inference; returns how many. Call it last, once the model will not be copied or changed."""
    if not available():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu" \
                and not isinstance(module.__dict__.get("forward"), PackedForward):
            module.forward = PackedForward(module)  # type: ignore[method-assign,assignment]
            packed += 1
    return packed
