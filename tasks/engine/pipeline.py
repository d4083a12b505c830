"""The predictors that hand each shard's rows to the real `pipeline` object: correct by construction,
with the sharding, streaming and exactly-once machinery around it unchanged."""
from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.predictor import OptionsT, Predictor


class PipelinePredictor(Predictor[OptionsT]):
    """Rows sorted by length (`preprocess`), run through `pipeline(pipeline_task)` in small batches
    (`_forward`), its results as columns (`postprocess`, through `_rows`)."""

    pipeline_task: ClassVar[str] = ""
    pipeline_batch_size: ClassVar[int] = 8
    squeezes_single_row: ClassVar[bool] = False
    """The pipeline returns a one-row list's result unwrapped."""
    first_token_head: ClassVar[bool] = False
    """A sequence-classification head that reads the first token only (`first_token.py`)."""

    def __init__(self, model: ModelRef, options: OptionsT, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        from transformers import pipeline

        kwargs: dict = {"dtype": self._torch_dtype()} if self.device == "cuda" else {}
        self.pipe: Any = pipeline(self.pipeline_task, model=model.path, tokenizer=model.path, device=self.device,
                             model_kwargs={"use_safetensors": not settings.allow_pickle_weights},
                             trust_remote_code=settings.trust_remote_code,
                             **self._pipeline_kwargs(), **kwargs)  # type: ignore[call-overload]
        self.pipe.model = self._prepare(self.pipe.model, first_token_head=self.first_token_head)

    def _pipeline_kwargs(self) -> dict:
        return {}

    def _call_kwargs(self) -> dict:
        return {}

    def _rows(self, results: list) -> dict[str, list]:
        """The prediction columns of the pipeline's results (one per row, in row order)."""
        raise NotImplementedError

    def preprocess(self, inputs: dict[str, list], row_ids: list[str] | None = None) -> tuple[list[str], list[int]]:
        texts = inputs["text"]
        return texts, sorted(range(len(texts)), key=lambda i: len(texts[i]))

    def _forward(self, features: tuple[list[str], list[int]], batch_tokens: int) -> list:
        texts, order = features
        with self.lock, self._kernels():
            out = self.pipe([texts[i] for i in order], batch_size=self.pipeline_batch_size, **self._call_kwargs())
        return [out] if len(texts) == 1 and self.squeezes_single_row else out

    def postprocess(self, outputs: list, features: tuple[list[str], list[int]]) -> pa.Table:
        texts, order = features
        results: list = [None] * len(texts)
        for i, r in zip(order, outputs):
            results[i] = r
        return pa.table(self._rows(results), schema=self.schema)
