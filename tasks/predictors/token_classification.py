"""Token classification (named entities) in bulk: aggregated entities per row, through
`pipeline("token-classification")`."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from hfbatch.tasks.core.options import Options
from hfbatch.tasks.engine.pipeline import PipelinePredictor


class TokenClassificationOptions(Options):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="how word pieces are merged into entities")


class TokenClassificationPredictor(PipelinePredictor[TokenClassificationOptions]):
    """`entities`: the pipeline's aggregated entities (group, score, word, character span)."""

    task = "token-classification"
    aliases = ("ner",)
    heads = ("ForTokenClassification",)
    options_class = TokenClassificationOptions
    pipeline_task = "token-classification"

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        item = pa.struct([("entity_group", pa.string()), ("score", pa.float32()), ("word", pa.string()),
                          ("start", pa.int32()), ("end", pa.int32())])
        return pa.schema([("entities", pa.list_(item))])

    def _pipeline_kwargs(self) -> dict:
        return {"aggregation_strategy": self.options.aggregation_strategy}

    def _rows(self, results: list) -> dict[str, list]:
        keys = ("entity_group", "score", "word", "start", "end")
        return {"entities": [[{k: e.get(k, e.get("entity")) for k in keys} for e in r] for r in results]}
