"""The direct path of the encoder tasks (classification, embeddings, extractive QA), where the speed
is: the rows are tokenized without padding (`preprocess`), sorted by token length, cut into batches by
a token budget (rows x longest row <= `batch_tokens`), padded only to the longest row of their batch
and run under `torch.inference_mode()` (`_forward`); on the CPU several batches run at once, each on
one thread (`cpu.py`); results go back in input order (`postprocess`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from hfbatch.tasks.core.models import load_tokenizer
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine import cpu
from hfbatch.tasks.engine.batching import pad_batch, token_budget_batches
from hfbatch.tasks.engine.predictor import OptionsT, Predictor


@dataclass
class Encoded:
    """Tokenized rows: token ids (and token types), unpadded, and their lengths."""

    ids: list
    types: list | None
    lengths: np.ndarray


class EncoderPredictor(Predictor[OptionsT]):
    """Tokenize, sort, budget, pad, forward; a subclass says how a batch's model outputs become one row
    of floats per input row (`_batch_outputs`) and those rows a table (`postprocess`)."""

    auto_class: ClassVar[str] = "AutoModel"
    """The `transformers` auto class that loads the model."""
    first_token_head: ClassVar[bool] = False
    """Sequence classification: the head may read the first token only (`first_token.py`)."""
    rescores_close_calls: ClassVar[bool] = False
    """int8: every encoder layer quantized, and the rows whose two best scores are close scored again by
    the fp32 model (`close_calls`), instead of the first layer kept in fp32 for every row."""

    def __init__(self, model: ModelRef, options: OptionsT, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        self.tokenizer = load_tokenizer(model, settings)
        self.model = self._prepare(self._load(), self.first_token_head, self.rescores_close_calls)
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(x for x in limits if x and x < 1_000_000)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.rescored_rows = 0
        """Rows scored again in fp32 so far (int8 close calls)."""

    def _load(self):
        import transformers

        return getattr(transformers, self.auto_class).from_pretrained(self.model_ref.path, **self._load_kwargs())

    def preprocess(self, inputs: dict[str, list], row_ids: list[str] | None = None) -> Encoded:
        enc = self.tokenizer(inputs["text"], truncation=True, max_length=self.max_length)
        ids = enc["input_ids"]
        return Encoded(ids, enc.get("token_type_ids"), np.fromiter((len(x) for x in ids), dtype=np.int64,
                                                                   count=len(ids)))

    def tokens(self, features: Any) -> int:
        return int(features.lengths.sum())

    def _forward(self, features: Any, batch_tokens: int) -> Any:
        outputs = self._outputs(self.model, features, batch_tokens)
        if self.precision == "int8" and self.rescores_close_calls:
            close = self.close_calls(outputs)
            with self.lock:  # shards of a thread runner share this predictor
                self.rescored_rows += len(close)
            if len(close):
                again = Encoded([features.ids[i] for i in close],
                                None if features.types is None else [features.types[i] for i in close],
                                features.lengths[close])
                outputs[close] = self._outputs(self.exact_model, again, batch_tokens)
        return outputs

    def _batch_outputs(self, model, batch: dict) -> np.ndarray:
        """One row of `model`'s output per batch row (float32, on the CPU)."""
        raise NotImplementedError

    def close_calls(self, outputs: np.ndarray) -> np.ndarray:
        """Rows whose int8 outputs are too close to call (`rescores_close_calls` predictors)."""
        return np.zeros(0, dtype=np.int64)

    def postprocess(self, outputs: Any, features: Any) -> pa.Table:
        raise NotImplementedError

    def _outputs(self, model, features: Encoded, batch_tokens: int) -> np.ndarray:
        """`_batch_outputs` of `model` over the tokenized rows, in token-budget batches, back in row order.
        On a tuned CPU (`cpu.tune_cpu`) the batches run on its streams, several at once; else one after
        another."""
        import torch

        from hfbatch.tasks.engine.allocator import cap_freed_memory

        ids, types, lengths = features.ids, features.types, features.lengths
        left = self.tokenizer.padding_side == "left"

        def run(rows: np.ndarray) -> np.ndarray:
            cap_freed_memory()
            batch = pad_batch(rows, ids, types, lengths, self.pad_id, left)
            with torch.inference_mode(), self._kernels():
                return self._batch_outputs(model, {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()})

        batches = token_budget_batches(lengths, batch_tokens)[::-1]  # the longest rows, the costliest, first
        streams = cpu.streams() if self.device == "cpu" else None
        if streams is not None:
            results = streams.map(run, batches)
        else:
            with self.lock:  # shards of a thread runner share this predictor
                results = [run(rows) for rows in batches]
        outputs = np.empty((len(ids), *results[0].shape[1:]), dtype=results[0].dtype)
        for rows, out in zip(batches, results):
            outputs[rows] = out
        return outputs
