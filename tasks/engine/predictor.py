"""Predictors: turn columns of input strings into prediction columns, as `transformers.pipeline` would.

Each task's predictor lives in its recipe (`tasks/recipes/`); this module holds what they share.

`EncoderPredictor` runs the model directly, which is where the speed is: the rows of a shard are
sorted by token length, cut into batches by a token budget (rows x longest row <= `batch_tokens`),
padded only to the longest row of their batch, and run under `torch.inference_mode()`; on the CPU
several batches run at once, each on one thread (`streams.py`); results go back in input order.

`PipelinePredictor` hands each length-sorted list of rows to the real `pipeline` object: correct by
construction, with the sharding, streaming and exactly-once machinery around it unchanged.

A predictor is loaded once per process and reused by every shard (`get_predictor`).
"""
from __future__ import annotations

import contextlib
import threading
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.models import load_tokenizer, model_kwargs, pick_device
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings

PRECISIONS = ("auto", "int8", "bf16")
CPU_BATCH_TOKENS = 4096
"""Token budget of one batch on a CPU: batches are not faster per token past a few thousand tokens,
and each stream (`streams.py`) holds one batch (figures: `benchmarks/RESULTS.md`)."""
CUDA_BATCH_TOKENS = 65_536
"""On a GPU a batch costs kernel launches and Python time: larger batches."""


class Predictor:
    """Base class: `predict` maps `{input name: list of str}` to a table of prediction columns.

    `options` is the recipe's inference options; `settings.device` the wanted device; `precision` is
    `auto` (fp32 on CPU, bf16/fp16 on CUDA), `int8` (CPU only) or `bf16` (on a CPU with bf16 units: the
    model's weights and activations in bf16, faster, scores approximate)."""

    inputs: ClassVar[tuple[str, ...]] = ("text",)
    first_token_head: ClassVar[bool] = False
    """Sequence classification: the head may read the first token only (`first_token.py`)."""
    rescores_close_calls: ClassVar[bool] = False
    """int8: every encoder layer quantized, and the rows whose two best scores are close scored again by
    the fp32 model (`close_calls`), instead of the first layer kept in fp32 for every row."""
    uses_row_ids: ClassVar[bool] = False
    """`predict` takes `row_ids`, the runner's stable id of each row (e.g. to seed per-row sampling)."""

    def __init__(self, model: ModelRef, options: BaseModel, settings: Settings, precision: str = "auto"):
        self.model_ref, self.options, self.settings = model, options, settings
        self.device, self.precision = pick_device(settings.device)
        if precision == "int8":
            if self.device != "cpu":
                raise ConfigError(f"precision 'int8' is a CPU mode; on {self.device} use 'auto' ({self.precision}), "
                                  "or device 'cpu' (HFBATCH_DEVICE=cpu) to run on this host's CPU")
            self.precision = "int8"
        elif precision == "bf16" and self.precision != "bf16":
            if self.device != "cpu" or not cpu_has_bf16():
                raise ConfigError(f"precision 'bf16' needs bf16 units (a GPU with bf16, or a CPU with AVX512-BF16 "
                                  f"or AMX); this {self.device} has none: use 'auto' ({self.precision})")
            self.precision = "bf16"
        if self.device == "cpu":
            from hfbatch.tasks.engine.allocator import keep_freed_memory

            keep_freed_memory()
        self.lock = threading.Lock()

    @classmethod
    def output_schema(cls, options: BaseModel) -> pa.Schema:
        """The prediction columns, known before any model is loaded."""
        raise NotImplementedError

    @property
    def schema(self) -> pa.Schema:
        return self.output_schema(self.options)

    @classmethod
    def check(cls, options: BaseModel) -> None:
        """Raise `ConfigError` for options this task cannot run with (before any model is loaded)."""

    @classmethod
    def input_columns(cls, options: BaseModel) -> dict[str, str]:
        """Inputs whose column one of the task's options names (it wins over `text_column`)."""
        return {}

    @classmethod
    def chat_inputs(cls, options: BaseModel) -> tuple[str, ...]:
        """Inputs that are chats, lists of {role, content} structs, rather than strings."""
        return ()

    def problem(self, row: dict[str, str]) -> str | None:
        """Why a (non-empty, string) row cannot be predicted, or None."""
        return None

    def predict(self, inputs: dict[str, list[str]], batch_tokens: int) -> tuple[pa.Table, int]:
        """Prediction columns for the rows, in input order, and the number of real tokens processed.
        A predictor with `uses_row_ids` also takes `row_ids=`: the rows' ids, in the same order."""
        raise NotImplementedError

    @property
    def batch_tokens(self) -> int:
        """Default token budget of one batch on this predictor's device."""
        return CUDA_BATCH_TOKENS if self.device == "cuda" else CPU_BATCH_TOKENS

    def _kernels(self):
        """Run the model with these attention kernels. On CUDA, not cuDNN's: it builds a plan for every
        new (rows, width) shape, and token-budget batches come in many shapes (`benchmarks/RESULTS.md`)."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def _load_kwargs(self) -> dict:
        kwargs = model_kwargs(self.settings)
        if self.device == "cuda" or self.precision == "bf16":
            kwargs["dtype"] = self._torch_dtype()
        return kwargs

    def _prepare(self, model):
        """`model` on this predictor's device, in eval mode, its last layer cut to the first token where
        the head reads only that (on CPU: on CUDA the forward passes are a small part of the time), its
        linear layers int8 where asked, the fp32 ones packed for oneDNN on CPU."""
        from hfbatch.tasks.engine.first_token import first_token_only

        model = model.to(self.device).eval()
        self.first_token_only = self.first_token_head and self.device == "cpu" and first_token_only(model)
        if self.precision != "int8":
            return self._packed(model)
        from hfbatch.tasks.engine.quantize import quantize_int8

        quantized = quantize_int8(model, keep_first_layer=not self.rescores_close_calls)
        if self.rescores_close_calls:
            self.exact_model = self._packed(model)
        return self._packed(quantized)  # the layers kept in fp32

    def _packed(self, model):
        """`model` with its fp32 linear layers on oneDNN's packed weights, on CPU (`onednn.py`), unless
        the settings ask for torch's own kernels."""
        if self.device == "cpu" and self.settings.cpu_kernels == "onednn":
            from hfbatch.tasks.engine.onednn import pack_linear_layers

            pack_linear_layers(model)
        return model


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, pad_slack: float = 0.1, min_slack: int = 8
                         ) -> list[np.ndarray]:
    """Row indices sorted by length, cut so that rows x longest row <= `batch_tokens` per batch (a row
    longer than the budget gets a batch of its own) and so that no row is padded by more than
    `max(min_slack, pad_slack x shortest row)` tokens: padding is compute thrown away, and a budget
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


def pad_batch(rows: np.ndarray, ids: list, types: list | None, lengths: np.ndarray, pad_id: int,
              left: bool = False) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask` (and `token_type_ids` when `types` is given) of `rows`, padded to
    the longest of them, on the right or, for `left`, on the left."""
    width = int(lengths[rows].max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
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
    return batch


class EncoderPredictor(Predictor):
    """Shared machinery of the direct paths: tokenize without padding, sort, budget, pad, forward."""

    def __init__(self, model: ModelRef, options: BaseModel, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        self.tokenizer = load_tokenizer(model, settings)
        self.model = self._prepare(self._load())
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(x for x in limits if x and x < 1_000_000)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.rescored_rows = 0
        """Rows scored again in fp32 so far (int8 close calls)."""

    def _load(self):
        raise NotImplementedError

    def _forward(self, model, batch: dict) -> np.ndarray:
        """One row of `model`'s output per batch row (float32, on the CPU)."""
        raise NotImplementedError

    def _table(self, outputs: np.ndarray) -> pa.Table:
        raise NotImplementedError

    def _empty_output(self) -> np.ndarray:
        raise NotImplementedError

    def close_calls(self, outputs: np.ndarray) -> np.ndarray:
        """Rows whose int8 outputs are too close to call (`rescores_close_calls` predictors)."""
        return np.zeros(0, dtype=np.int64)

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

        from hfbatch.tasks.engine.allocator import cap_freed_memory

        left, cpu = self.tokenizer.padding_side == "left", self.device == "cpu"

        def run(rows: np.ndarray) -> np.ndarray:
            if cpu:
                cap_freed_memory()
            batch = pad_batch(rows, ids, types, lengths, self.pad_id, left)
            with torch.inference_mode(), self._kernels():
                return self._forward(model, {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()})

        batches = token_budget_batches(lengths, batch_tokens)[::-1]  # the longest rows, the costliest, first
        if self.device == "cpu":
            from hfbatch.tasks.engine.streams import cpu_streams

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


class PipelinePredictor(Predictor):
    """Delegates each shard's rows (length-sorted, in small batches) to the real `pipeline` object."""

    pipeline_task: ClassVar[str] = ""
    pipeline_batch_size: ClassVar[int] = 8
    squeezes_single_row: ClassVar[bool] = False
    """The pipeline returns a one-row list's result unwrapped."""

    def __init__(self, model: ModelRef, options: BaseModel, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        from transformers import pipeline

        kwargs = {"dtype": self._torch_dtype()} if self.device == "cuda" else {}
        self.pipe = pipeline(self.pipeline_task, model=model.path, tokenizer=model.path, device=self.device,
                             model_kwargs={"use_safetensors": not settings.allow_pickle_weights},
                             trust_remote_code=settings.trust_remote_code,
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
                out = [out]
            for i, r in zip(order, out):
                results[i] = r
        return pa.table(self._rows(results), schema=self.schema), 0


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX): elsewhere bf16 is emulated, slower
    than fp32."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported() or amx())


_CACHE: dict[tuple, Predictor] = {}
_CACHE_LOCK = threading.Lock()


def get_predictor(cls: type[Predictor], model: ModelRef, options: BaseModel, settings: Settings,
                  precision: str = "auto") -> Predictor:
    """The `cls` predictor of `model`, loaded on first use and then reused by every shard of this process
    (a worker loads each model once)."""
    key = (cls, model.path, model.fingerprint, options, precision, pick_device(settings.device), settings)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = cls(model, options, settings, precision)
        return _CACHE[key]
