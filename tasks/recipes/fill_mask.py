"""Fill-mask: the top-k tokens for a row's single mask token (bulk inference only, through `pipeline`)."""
from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.engine.predictor import PipelinePredictor
from hfbatch.tasks.recipes.base import Options, Recipe

TOP_K_DESCRIPTION = ("fill-mask: tokens to return per row (default: 5); sampling (text generation): keep the K "
                     "likeliest tokens, 0: all (default: the model's generation config)")
DEFAULT_TOP_K = 5


class FillMaskOptions(Options):
    top_k: int | None = Field(None, ge=0, description=TOP_K_DESCRIPTION)


class FillMaskPredictor(PipelinePredictor):
    """`predictions`: the top-k tokens for the (single) mask token, with scores and filled sequences."""

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

    @classmethod
    def check(cls, options) -> None:
        if options.top_k == 0:
            raise ConfigError("fill-mask: top_k must be at least 1 (the tokens to return per row)")

    def _call_kwargs(self) -> dict:
        return {"top_k": DEFAULT_TOP_K if self.options.top_k is None else self.options.top_k}

    def _rows(self, results: list) -> dict[str, list]:
        return {"predictions": [[{k: p[k] for k in ("token", "token_str", "score", "sequence")} for p in r]
                                for r in results]}


class FillMask(Recipe):
    task = "fill-mask"
    predictor = FillMaskPredictor
    heads = ("ForMaskedLM",)
    infer_options = FillMaskOptions
