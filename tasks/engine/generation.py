"""Bulk text generation: the predictor base of translation, summarization, text2text-generation and
text-generation, and the generation options they share (in bulk inference and, for the seq2seq tasks,
in training's evaluation).

Each row gets the tokens `model.generate` would give it alone with the same generation config (the
model's `generation_config.json`, then the run's options): greedy search and beam search exactly, sampling
from the row's own `torch.Generator`, seeded from the run's seed and the row's id, so that a row's text
depends on neither the batch, the shard, the thread count nor a rerun.

How it is fast (`generation_engine.py`): the rows are sorted by cost (input tokens + tokens they may
generate, the longest first) and decoded with a key/value cache in lanes, one per CPU stream (`cpu.py`,
each lane on one thread) or one on a GPU. A lane holds as many sequences as its token budget allows,
counting the tokens still to be generated; a row leaves as soon as it ends and, when a quarter of the
budget is free, the next rows are prefilled together and join the running batch (continuous batching,
`generation_batch.py`), so no step is spent on a finished row or on padding to the longest output of a
fixed batch. Choosing tokens (`generation_search.py`) and decoding the texts are done for the whole batch
at once.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import pyarrow as pa
from pydantic import Field

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.models import load_tokenizer
from hfbatch.tasks.core.monitoring import CATEGORICAL
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine import cpu
from hfbatch.tasks.engine.predictor import CUDA_BATCH_TOKENS, Predictor

log = logging.getLogger(__name__)

CPU_GENERATION_TOKENS = 8192
"""Default token budget of one lane on a CPU (inputs plus the tokens to generate, per sequence)."""
DEFAULT_MAX_NEW_TOKENS = 128
"""Longest output of a sequence-to-sequence model when neither the options nor its generation config
say (run_translation.py's and run_summarization.py's default target length)."""


class GenerationOptions(Options):
    """What generation takes, in training's evaluation and in bulk inference alike."""

    source_prefix: str = Field("", description="text put before every input, e.g. 'translate German to "
                               "English: ' for T5")
    forced_bos_token: str | None = Field(None, description="the target language code token every output starts "
                                         "with (mBART, NLLB), e.g. de_DE")
    num_beams: int | None = Field(None, ge=1, description="beams of the beam search (default: the model's "
                                  "generation config, else 1: greedy)")


class GenerationInferOptions(GenerationOptions):
    """Bulk generation: length, beams, and sampling (each row from its own generator, seeded by `seed`
    and the row's id). Unset fields take the model's generation config."""

    max_new_tokens: int | None = Field(None, ge=1, description="longest output in new tokens (default: the "
                                       "model's generation config, else "
                                       f"{DEFAULT_MAX_NEW_TOKENS} for sequence-to-sequence models)")
    do_sample: bool | None = Field(None, description="sample the output instead of searching for the likeliest "
                                   "(default: the model's generation config)")
    temperature: float | None = Field(None, gt=0, description="sampling: temperature of the next-token "
                                      "distribution (default: the model's generation config)")
    top_p: float | None = Field(None, gt=0, le=1, description="sampling: nucleus filtering, the smallest set of "
                                "tokens whose probability reaches P (default: the model's generation config)")
    top_k: int | None = Field(None, ge=0, description="sampling: keep the K likeliest tokens, 0: all (default: "
                              "the model's generation config)")
    seed: int = Field(0, description="sampling: seed of the run; a row's sample depends on it and the row's id "
                                     "only (not on shards, batches or threads)")


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed: from the run's seed and the row's id only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def token_id(tokenizer, token: str) -> int:
    """The id of a (language code) token; a `ConfigError` if the tokenizer does not know it."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ConfigError(f"forced_bos_token {token!r} is not a token of the tokenizer of "
                          f"{tokenizer.name_or_path!r}; it must be one of its language codes (e.g. de_DE, deu_Latn)")
    return int(found)


def with_search(config, tokenizer, num_beams: int | None, forced_bos_token: str | None):
    """A generation config with these beams and forced first token (where given)."""
    if num_beams:
        config.num_beams = num_beams
        if num_beams == 1:  # beam-only settings (a checkpoint's own) make a greedy config invalid to save
            config.early_stopping = config.length_penalty = None
    if forced_bos_token:
        config.forced_bos_token_id = token_id(tokenizer, forced_bos_token)
    return config


def with_sampling(config, options: Options):
    """The sampling options (`do_sample`, `temperature`, `top_p`, `top_k`) that are set, into `config`."""
    for name in ("do_sample", "temperature", "top_p", "top_k"):
        value = getattr(options, name, None)
        if value is not None:
            setattr(config, name, value)
    return config


def seq2seq_generation_config(model, tokenizer, options: GenerationOptions):
    """A copy of `model`'s generation config with the options applied, and its limit of new tokens.
    The limit goes where the model's config keeps its own (`max_new_tokens`, else `max_length`, which
    counts the decoder start token) so that `generate` sees no conflicting pair."""
    config = with_search(copy.deepcopy(model.generation_config), tokenizer, options.num_beams,
                         options.forced_bos_token)
    with_sampling(config, options)
    limit = (getattr(options, "max_new_tokens", None) or config.max_new_tokens
             or (config.max_length - 1 if config.max_length else DEFAULT_MAX_NEW_TOKENS))
    if config.max_new_tokens is not None:
        config.max_new_tokens = limit
    else:
        config.max_length = limit + 1
    return config, limit


G = TypeVar("G", bound=GenerationInferOptions)


@dataclass
class Prompts:
    """Each row's input token ids (truncated), its new-token limit and its sampling seed (or None)."""

    ids: list[list[int]]
    limits: list[int]
    seeds: list[int] | None


class GenerationPredictor(Predictor[G]):
    """`generated_text`, `input_tokens` (after truncation), `output_tokens` (new tokens, to and with the end
    token) and `finish_reason` (`eos`, or `length` at the limit) of each row, by `GenerationEngine`.

    Inputs longer than the model takes are truncated, counted in `truncated_rows` and logged."""

    uses_row_ids = True
    options_class: ClassVar[type[Options]] = GenerationInferOptions
    auto_class: ClassVar[str] = ""
    strip: ClassVar[bool] = True
    """Strip the decoded text (seq2seq outputs); text-generation keeps what `pipeline` gives."""

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        """The answer, its token counts and why it ended. Answers that can only be one of `choices` say so
        in their field's metadata (`CATEGORICAL`): their shares are a figure of the run, as labels are."""
        choices = getattr(options, "choices", None)
        text = pa.field("generated_text", pa.string(), metadata={CATEGORICAL: b"true"} if choices else None)
        return pa.schema([text, ("input_tokens", pa.int32()), ("output_tokens", pa.int32()),
                          ("finish_reason", pa.string())])

    def __init__(self, model: ModelRef, options: G, settings: Settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        import transformers

        from hfbatch.tasks.engine.generation_engine import GenerationEngine

        self.tokenizer = load_tokenizer(model, settings)
        self.model = self._prepare(getattr(transformers, self.auto_class).from_pretrained(model.path,
                                                                                         **self._load_kwargs()))
        self.generation_config = self._configure()
        self.engine = GenerationEngine(self.model, self.generation_config, self.device, guide=self._guide())
        self.truncated_rows = 0
        """Rows longer than the model takes, truncated so far."""

    @property
    def batch_tokens(self) -> int:
        return CUDA_BATCH_TOKENS if self.device == "cuda" else CPU_GENERATION_TOKENS

    @property
    def answers_depend_on_row_id(self) -> bool:
        return self.engine.sampling

    def _configure(self):
        """The model's generation config with the options applied; sets the input and output limits."""
        raise NotImplementedError

    def _guide(self):
        """The run's constraint compiled for this model (`constraints.Guide`), or None."""
        return None

    def _encode(self, inputs: dict[str, list]) -> tuple[list[list[int]], list[int]]:
        """Each row's input token ids (truncated) and new-token limit."""
        raise NotImplementedError

    def _tokenize(self, texts: list[str], cap: int, **kwargs) -> list[list[int]]:
        """`texts` tokenized and truncated to `cap` tokens; the rows that were longer are counted."""
        ids = self.tokenizer(texts, truncation=True, max_length=cap, **kwargs)["input_ids"]
        full = [i for i, x in enumerate(ids) if len(x) >= cap]
        if full:  # at the cap: cut, or exactly that long
            whole = self.tokenizer([texts[i] for i in full], verbose=False, **kwargs)["input_ids"]
            self._count_truncated(sum(len(x) > cap for x in whole), len(texts), cap)
        return ids

    def _count_truncated(self, n: int, rows: int, cap: int) -> None:
        if n:
            with self.lock:
                self.truncated_rows += n
            log.warning("%d of %d rows are longer than the %d input tokens %s takes: truncated", n, rows, cap,
                        self.model_ref.source)

    def preprocess(self, inputs: dict[str, list], row_ids: list[str] | None = None) -> Prompts:
        """The prompts; `row_ids` (the batch job's stable ids) seed the sampling, else a row's id is its
        position in `inputs`."""
        ids, limits = self._encode(inputs)
        seeds = None
        if self.engine.sampling:
            seeds = [row_seed(self.options.seed, r) for r in (row_ids or [str(i) for i in range(len(ids))])]
        return Prompts(ids, limits, seeds)

    def tokens(self, features: Prompts) -> int:
        return sum(len(x) for x in features.ids)

    def _forward(self, features: Prompts, batch_tokens: int) -> list[tuple[list[int], str]]:
        streams = cpu.streams() if self.device == "cpu" else None
        if streams is not None:
            return self.engine.generate(features.ids, features.limits, batch_tokens, features.seeds, streams)
        with self.lock, self._kernels():  # shards of a thread runner share the model
            return self.engine.generate(features.ids, features.limits, batch_tokens, features.seeds)

    def postprocess(self, outputs: list[tuple[list[int], str]], features: Prompts) -> pa.Table:
        texts = self.tokenizer.batch_decode([tokens for tokens, _ in outputs], skip_special_tokens=True)
        texts = [t.strip() if self.strip else t for t in texts]
        reasons = [reason for _, reason in outputs]
        columns = {"generated_text": pa.array(texts, pa.string()),
                   "input_tokens": pa.array([len(x) for x in features.ids], pa.int32()),
                   "output_tokens": pa.array([len(tokens) for tokens, _ in outputs], pa.int32()),
                   "finish_reason": pa.array(reasons, pa.string())}
        return pa.table(columns | self._more_columns(texts, reasons), schema=self.schema)

    def _more_columns(self, texts: list[str], reasons: list[str]) -> dict[str, pa.Array]:
        """A task's own columns beside the text (as its `output_schema` declares them)."""
        return {}
