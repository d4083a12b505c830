"""Predictors: turn the input columns of a batch of rows into prediction columns, as
`transformers.pipeline` would, in three steps, as a pipeline does: `preprocess` (the rows' values into
model inputs), `_forward` (the model over those inputs, in batches), `postprocess` (the outputs into an
Arrow table). Each task's predictor is one module of `tasks/predictors/`, found by task name.

A predictor declares what it reads from a row (`inputs`: names and `core.inputs` kinds, text or chats
or anything else) and what it writes (`output_schema`), both known before a model is loaded, so the
batch job checks an input's schema against them without knowing the task. It is loaded once per process
and reused by every shard (`PredictorSpec.load`).
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa

from hfbatch.tasks.core.errors import ConfigError, ModelError
from hfbatch.tasks.core.inputs import TEXT, InputKind
from hfbatch.tasks.core.models import model_kwargs, pick_device
from hfbatch.tasks.core.options import NoOptions, Options
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings

PRECISIONS = ("auto", "int8", "bf16")
CPU_BATCH_TOKENS = 4096
"""Token budget of one batch on a CPU: batches are not faster per token past a few thousand tokens,
and each stream (`streams.py`) holds one batch (figures: `benchmarks/RESULTS.md`)."""
CUDA_BATCH_TOKENS = 65_536
"""On a GPU a batch costs kernel launches and Python time: larger batches."""


OptionsT = TypeVar("OptionsT", bound=Options)


class Predictor(Generic[OptionsT]):
    """Base class of every task's predictor: `predict` is `postprocess(_forward(preprocess(inputs)))`.

    `options` are the task's inference options (`options_class`); `settings.device` the wanted device;
    `precision` is `auto` (fp32 on CPU, bf16/fp16 on CUDA), `int8` (CPU only) or `bf16` (on a CPU with
    bf16 units: the model's weights and activations in bf16, faster, scores approximate)."""

    task: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    options_class: ClassVar[type[Options]] = NoOptions
    heads: ClassVar[tuple[str, ...]] = ()
    """Endings of the architectures (`config.architectures`) that have this task's head, e.g.
    `ForSequenceClassification`: a checkpoint without one would predict from a random head."""
    uses_row_ids: ClassVar[bool] = False
    """`preprocess` reads the rows' stable ids (e.g. to seed per-row sampling)."""

    @property
    def answers_depend_on_row_id(self) -> bool:
        """Whether a row's answer depends on its id (seeded sampling): then a result is reused only for
        the same row id."""
        return False

    def __init__(self, model: ModelRef, options: OptionsT, settings: Settings, precision: str = "auto"):
        self.model_ref, self.options, self.settings = model, options, settings
        self.device, self.precision = pick_device(settings.device)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
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
        self.lock = threading.Lock()

    # --- what the batch job knows before loading ---------------------------------------------------------
    @classmethod
    def inputs(cls, options: OptionsT) -> dict[str, InputKind]:
        """What a row gives the predictor: `{input name: kind}`; a column of the input name (or, for
        `text`, the run's text column) holds it unless `input_columns` says otherwise."""
        return {"text": TEXT}

    @classmethod
    def input_columns(cls, options: OptionsT) -> dict[str, str]:
        """Inputs whose column one of the task's options names (it wins over the run's text column)."""
        return {}

    @classmethod
    def output_schema(cls, options: OptionsT) -> pa.Schema:
        """The prediction columns."""
        raise NotImplementedError

    @classmethod
    def for_model(cls, model: ModelRef, options: OptionsT) -> tuple[OptionsT, list[str]]:
        """The options a run uses with this model (what a fine-tuned model brings where the options are
        silent, e.g. its prompt template) and notes for the run's summary; read before any model is loaded."""
        return options, []

    @classmethod
    def check_checkpoint(cls, model: ModelRef) -> None:
        """Refuse a checkpoint that lacks this task's head: its head would be freshly initialised, and
        the answers random."""
        if cls.heads and has_head(model, cls.heads, (cls.task, *cls.aliases)) is False:
            architectures = json.loads((Path(model.path) / "config.json").read_text()).get("architectures")
            raise ModelError(f"model {model.source!r} ({', '.join(architectures or ['no architecture'])}) "
                             f"has no {cls.task} head: it would predict at random. Fine-tune it first "
                             f"(hfbatch train --task {cls.task}) or choose a {cls.task} checkpoint")

    # --- the three steps ---------------------------------------------------------------------------------
    @property
    def schema(self) -> pa.Schema:
        return self.output_schema(self.options)

    def problem(self, row: dict[str, Any]) -> str | None:
        """Why a row (its inputs, each of the right kind) cannot be predicted, or None."""
        return None

    def preprocess(self, inputs: dict[str, list], row_ids: list[str] | None = None) -> Any:
        """The model inputs of the rows (`{input name: values}`, in row order)."""
        raise NotImplementedError

    def _forward(self, features: Any, batch_tokens: int) -> Any:
        """The model's outputs for `preprocess`'s features, in batches of at most `batch_tokens` tokens."""
        raise NotImplementedError

    def postprocess(self, outputs: Any, features: Any) -> pa.Table:
        """The prediction columns of the rows, in row order."""
        raise NotImplementedError

    def tokens(self, features: Any) -> int:
        """Real (unpadded) input tokens the model processed for these features."""
        return 0

    def predict(self, inputs: dict[str, list], batch_tokens: int | None = None,
                row_ids: list[str] | None = None) -> tuple[pa.Table, int]:
        """Prediction columns for the rows, in input order, and the number of real tokens processed.
        `row_ids` are the rows' stable ids (the batch job's), read by predictors that `uses_row_ids`."""
        if not next(iter(inputs.values()), []):
            return self.schema.empty_table(), 0
        features = self.preprocess(inputs, row_ids)
        outputs = self._forward(features, batch_tokens or self.batch_tokens)
        return self.postprocess(outputs, features), self.tokens(features)

    # --- shared machinery ---------------------------------------------------------------------------------
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

    def _prepare(self, model, first_token_head: bool = False, rescores_close_calls: bool = False):
        """`model` on this predictor's device, in eval mode, its last layer cut to the first token where
        the head reads only that (`first_token_head`, on CPU: on CUDA the forward passes are a small part
        of the time), its linear layers int8 where asked (all of them when `rescores_close_calls`, which
        keeps the fp32 model as `exact_model` to score close calls again; else all but the first
        encoder layer's), the fp32 ones packed for oneDNN on CPU."""
        from hfbatch.tasks.engine.first_token import first_token_only

        model = model.to(self.device).eval()
        self.first_token_only = first_token_head and self.device == "cpu" and first_token_only(model)
        if self.precision != "int8":
            return self._packed(model)
        from hfbatch.tasks.engine.quantize import quantize_int8

        quantized = quantize_int8(model, keep_first_layer=not rescores_close_calls)
        if rescores_close_calls:
            self.exact_model = self._packed(model)
        return self._packed(quantized)  # the layers kept in fp32

    def _packed(self, model):
        """`model` with its fp32 linear layers on oneDNN's packed weights, on CPU (`onednn.py`), unless
        the settings ask for torch's own kernels."""
        if self.device == "cpu" and self.settings.cpu_kernels == "onednn":
            from hfbatch.tasks.engine.onednn import pack_linear_layers

            pack_linear_layers(model)
        return model


def has_head(model: ModelRef, heads: tuple[str, ...], tasks: tuple[str, ...]) -> bool | None:
    """Whether the checkpoint has a head of `heads`: by its architectures, else by its model card's
    `pipeline_tag` (one of `tasks`); None when neither says."""
    config = json.loads((Path(model.path) / "config.json").read_text())
    if config.get("architectures"):
        return any(a.endswith(heads) for a in config["architectures"])
    card = Path(model.path) / "README.md"
    text = card.read_text(errors="replace") if card.exists() else ""
    tag = re.search(r"^pipeline_tag:\s*(\S+)", text, re.MULTILINE)
    return None if tag is None else tag.group(1) in tasks


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX): elsewhere bf16 is emulated, slower
    than fp32. Read from the flags the kernel reports (`/proc/cpuinfo`): torch has no public call for it."""
    import torch

    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@dataclass(frozen=True)
class PredictorSpec:
    """What a batch job is handed to predict with: a predictor class, its model, options, settings and
    precision. Small and picklable (a Dask worker loads the predictor from it)."""

    cls: type[Predictor[Any]]
    model: ModelRef
    options: Options
    settings: Settings
    precision: str = "auto"

    @property
    def task(self) -> str:
        return self.cls.task

    def inputs(self) -> dict[str, InputKind]:
        return self.cls.inputs(self.options)

    def output_schema(self) -> pa.Schema:
        return self.cls.output_schema(self.options)

    def load(self) -> Predictor[Any]:
        """The predictor, loaded on first use and then reused by every shard of this process (a worker
        loads each model once), in a process tuned for bulk inference on its CPU (`cpu.tune_cpu`)."""
        device = pick_device(self.settings.device)
        if device[0] == "cpu":
            from hfbatch.tasks.engine.cpu import tune_cpu

            tune_cpu()
        key = (self.cls, self.model.path, self.model.fingerprint, self.model.tokenizer_fingerprint, self.options,
               self.precision, device, self.settings)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = self.cls(self.model, self.options, self.settings, self.precision)
            return _CACHE[key]

    def release(self) -> None:
        """Hand back to the system the memory the predictor's batches freed (after each shard, on CPU)."""
        from hfbatch.tasks.engine.allocator import release_freed_memory

        release_freed_memory()


_CACHE: dict[tuple, Predictor[Any]] = {}
_CACHE_LOCK = threading.Lock()
