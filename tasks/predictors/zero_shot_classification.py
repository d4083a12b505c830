"""Zero-shot classification in bulk: an NLI model scores candidate labels, through `pipeline`."""
from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from hfbatch.tasks.core.options import Options
from hfbatch.tasks.engine.pipeline import PipelinePredictor


class ZeroShotOptions(Options):
    candidate_labels: tuple[str, ...] = Field(..., min_length=1, description="the labels to score",
                                              json_schema_extra={"cli_aliases": ["--labels"]})
    hypothesis_template: str = Field("This example is {}.", description="the hypothesis of each label")
    multi_label: bool = Field(False, description="score each label on its own")


class ZeroShotPredictor(PipelinePredictor[ZeroShotOptions]):
    """`label`/`score` of the best candidate label, and all `labels`/`scores` (best first)."""

    task = "zero-shot-classification"
    heads = ("ForSequenceClassification",)
    options_class = ZeroShotOptions
    pipeline_task = "zero-shot-classification"
    first_token_head = True

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("label", pa.string()), ("score", pa.float32()), ("labels", pa.list_(pa.string())),
                          ("scores", pa.list_(pa.float32()))])

    def _call_kwargs(self) -> dict:
        return {"candidate_labels": list(self.options.candidate_labels),
                "hypothesis_template": self.options.hypothesis_template, "multi_label": self.options.multi_label}

    def _rows(self, results: list) -> dict[str, list]:
        return {"label": [r["labels"][0] for r in results], "score": [r["scores"][0] for r in results],
                "labels": [r["labels"] for r in results], "scores": [r["scores"] for r in results]}
