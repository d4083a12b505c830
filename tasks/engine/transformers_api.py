"""The private parts of transformers' generation that hfbatch's own engine relies on, in one place, checked
once per process before the first use: a transformers release that renames or reshapes one of them fails
here, naming it and the release, not somewhere in the middle of a batch job.

Why the engine is hfbatch's own and not transformers' `generate_batch` (continuous batching with a paged
cache): measured on the same rows, `benchmarks/RESULTS.md` (issue 31).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from hfbatch.tasks.core.errors import ConfigError

METHODS = {
    ("GenerationMixin", "_prepare_generation_config"): ("generation_config",),
    ("GenerationMixin", "_prepare_special_tokens"): ("generation_config", "kwargs_has_attention_mask", "device"),
    ("GenerationMixin", "_get_logits_processor"): ("generation_config", "input_ids_seq_length", "encoder_input_ids",
                                                   "device"),
    ("DynamicLayer", "lazy_initialization"): ("key_states", "value_states"),
    ("DynamicLayer", "update"): ("key_states", "value_states"),
    ("DynamicLayer", "reorder_cache"): ("beam_idx",),
    ("DynamicLayer", "batch_select_indices"): ("indices",),
}
"""Methods the engine calls or overrides, and the parameters it passes them by name or position."""
CONFIG_TENSORS = ("_eos_token_tensor", "_pad_token_tensor", "_decoder_start_token_tensor")
"""What `_prepare_special_tokens` sets on a generation config, read by the engine."""


def _changed(message: str) -> ConfigError:
    import transformers

    return ConfigError(f"transformers {transformers.__version__}: {message}; hfbatch's generation engine relies on "
                       f"it (built against transformers 5.x): install the transformers version hfbatch pins")


@functools.cache
def check_private_api() -> None:
    """Raise a `ConfigError` naming what changed if a method in `METHODS` is gone or lost a parameter."""
    from transformers import GenerationMixin
    from transformers.cache_utils import DynamicLayer

    owners = {"GenerationMixin": GenerationMixin, "DynamicLayer": DynamicLayer}
    for (owner, name), params in METHODS.items():
        method = getattr(owners[owner], name, None)
        if method is None:
            raise _changed(f"{owner}.{name} no longer exists")
        missing = [p for p in params if p not in inspect.signature(method).parameters]
        if missing:
            raise _changed(f"{owner}.{name} no longer takes {', '.join(missing)}")


def prepared_config(model, config, device):
    """`config` completed as `generate` completes it (the model's defaults, the special tokens as tensors on
    `device`)."""
    check_private_api()
    config, _ = model._prepare_generation_config(config)
    model._prepare_special_tokens(config, True, device=device)
    missing = [name for name in CONFIG_TENSORS if not hasattr(config, name)]
    if missing:
        raise _changed(f"GenerationMixin._prepare_special_tokens no longer sets {', '.join(missing)}")
    return config


def special_tokens(config) -> tuple[Any, Any, Any]:
    """The end, pad and decoder start tokens of a `prepared_config`, as tensors (None where unset)."""
    return config._eos_token_tensor, config._pad_token_tensor, config._decoder_start_token_tensor


def logits_processors(model, config, prompt_len: int, encoder_ids: torch.Tensor | None, device):
    """`generate`'s logits processors for one row: `prompt_len` decoder input tokens, `encoder_ids` its
    encoder input (an encoder-decoder's), on `device`."""
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_len,
                                       encoder_input_ids=encoder_ids, device=device)
