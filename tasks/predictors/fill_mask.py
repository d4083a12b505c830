"""Fill-mask in bulk: the top-k tokens for a row's single mask token, through `pipeline`."""
from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from hfbatch.tasks.core.options import Options
from hfbatch.tasks.engine.pipeline import PipelinePredictor


class FillMaskOptions(Options):
    top_k: int = Field(5, ge=1, description="tokens to return per row")


class FillMaskPredictor(PipelinePredictor[FillMaskOptions]):
    """`predictions`: the top-k tokens for the (single) mask token, with scores and filled sequences."""

    task = "fill-mask"
    heads = ("ForMaskedLM",)
    options_class = FillMaskOptions
    pipeline_task = "fill-mask"
    squeezes_single_row = True

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        item = pa.struct([("token", pa.int32()), ("token_str", pa.string()), ("score", pa.float32()),
                          ("sequence", pa.string())])
        return pa.schema([("predictions", pa.list_(item))])

    def problem(self, row: dict[str, str]) -> str | None:
        mask = self.pipe.tokenizer.mask_token
        n = row["text"].count(mask)
        return None if n == 1 else f"expected exactly one mask token {mask}, found {n}"

    def _call_kwargs(self) -> dict:
        return {"top_k": self.options.top_k}

    def _rows(self, results: list) -> dict[str, list]:
        return {"predictions": [[{k: p[k] for k in ("token", "token_str", "score", "sequence")} for p in r]
                                for r in results]}
