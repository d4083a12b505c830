"""Translation and summarization: sequence-to-sequence models fine-tuned on (source, target) text pairs
as transformers' run_translation.py and run_summarization.py do it (an optional source prefix, labels
through `text_target=`, `Seq2SeqTrainer` evaluating with `generate`), scored with sacreBLEU's BLEU and
chrF (translation) or ROUGE (summarization), and run in bulk by the generation engine
(`inference/generation.py`); text2text-generation runs any sequence-to-sequence model in bulk the same
way (inference only).

Translation and summarization share one base recipe, `Seq2Seq`, that names no task (recipe discovery
skips it).
"""
from __future__ import annotations

import copy
import logging
import re
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.engine.generation import GenerationPredictor
from hfbatch.tasks.metrics import compute
from hfbatch.tasks.core.models import load_model, load_tokenizer, model_kwargs
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.recipes.base import Options, Recipe, first_bad_row, require_columns
from hfbatch.tasks.recipes.fill_mask import TOP_K_DESCRIPTION

log = logging.getLogger(__name__)

DEFAULT_GENERATION_MAX_LENGTH = 128
"""Longest output when neither the options nor the model's generation config say (run_translation.py's
and run_summarization.py's default target length)."""
SAMPLES = 20
"""(prediction, reference) pairs kept in an evaluation's details."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class GenerationOptions(Options):
    """What generation takes, in training (evaluation) and in bulk inference alike."""

    source_prefix: str = Field("", description="translation, summarization, text2text-generation, text-generation: "
                               "text put before every input, e.g. 'translate German to English: ' for T5")
    forced_bos_token: str | None = Field(None, description="translation, text2text-generation: the target language "
                                         "code token every output starts with (mBART, NLLB), e.g. de_DE")
    num_beams: int | None = Field(None, ge=1, description="translation, summarization, text2text-generation, "
                                  "text-generation: beams of the beam search (default: the model's generation "
                                  "config, else 1: greedy)")


class Seq2SeqOptions(GenerationOptions):
    source_column: str | None = Field(None, validate_default=True,
                                      description="translation, summarization: column of the input text "
                                                  "(required by these tasks)")
    target_column: str | None = Field(None, validate_default=True,
                                      description="translation, summarization: column of the reference translation "
                                                  "or summary (required by these tasks)")
    generation_max_length: int | None = Field(None, ge=1, description="translation, summarization: longest output "
                                              f"in tokens, in training and evaluation (default: "
                                              f"{DEFAULT_GENERATION_MAX_LENGTH})")

    @field_validator("source_column", "target_column")
    @classmethod
    def _required(cls, value, info):
        if value is None:  # a ConfigError is not wrapped by pydantic: it reaches the user as it is
            raise ConfigError(f"translation and summarization need --{info.field_name.replace('_', '-')} "
                              f"({info.field_name})")
        return value

    @property
    def target_length(self) -> int:
        return self.generation_max_length or DEFAULT_GENERATION_MAX_LENGTH


class Seq2SeqInferOptions(GenerationOptions):
    """Bulk generation: length, beams, and sampling (each row from its own generator, seeded by `seed`
    and the row's id). Unset fields take the model's generation config."""

    max_new_tokens: int | None = Field(None, ge=1, description="translation, summarization, text2text-generation, "
                                       "text-generation: longest output in new tokens (default: the model's "
                                       f"generation config; else {DEFAULT_GENERATION_MAX_LENGTH} for the seq2seq "
                                       "tasks, required by text-generation)")
    do_sample: bool | None = Field(None, description="translation, summarization, text2text-generation, "
                                   "text-generation: sample the output instead of searching for the likeliest "
                                   "(default: the model's generation config)")
    temperature: float | None = Field(None, gt=0, description="sampling: temperature of the next-token "
                                      "distribution (default: the model's generation config)")
    top_p: float | None = Field(None, gt=0, le=1, description="sampling: nucleus filtering, the smallest set of "
                                "tokens whose probability reaches P (default: the model's generation config)")
    top_k: int | None = Field(None, ge=0, description=TOP_K_DESCRIPTION)
    seed: int = Field(0, description="sampling: seed of the run; a row's sample depends on it and the row's id "
                                     "only (not on shards, batches or threads)")


def token_id(tokenizer, token: str) -> int:
    """The id of a (language code) token; a `ConfigError` if the tokenizer does not know it."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ConfigError(f"forced_bos_token {token!r} is not a token of the tokenizer of "
                          f"{tokenizer.name_or_path!r}; it must be one of its language codes (e.g. de_DE, deu_Latn)")
    return int(found)


class Seq2SeqPredictor(GenerationPredictor):
    """`generated_text` of each row as `model.generate` gives it for that row alone, with the model's
    generation config plus the options (`source_prefix`, `forced_bos_token`, `num_beams`, `max_new_tokens`,
    sampling), by the generation engine (`inference/generation.py`); `output_tokens` counts the new tokens
    up to and with the end token, `finish_reason` is `eos`, or `length` when the output reached
    `max_new_tokens` (also where the model forces an end token there). Inputs are truncated to what the
    encoder takes."""

    model_class = "AutoModelForSeq2SeqLM"

    def _configure(self):
        config, self.max_new_tokens = generation_config(self.model, self.tokenizer, self.options)
        encoder = self.model.get_encoder().config
        limits = [self.tokenizer.model_max_length, getattr(encoder, "max_position_embeddings", None)]
        self.max_length = min([x for x in limits if x and x < 1_000_000] or [1024])
        """Longest input, in tokens."""
        return config

    def _encode(self, inputs):
        ids = self._tokenize([self.options.source_prefix + t for t in inputs["text"]], self.max_length)
        return ids, [self.max_new_tokens] * len(ids)


def generation_config(model, tokenizer, options: GenerationOptions):
    """A copy of `model`'s generation config with the options applied, and its limit of new tokens.
    The limit goes where the model's config keeps its own (`max_new_tokens`, else `max_length`, which
    counts the decoder start token) so that `generate` sees no conflicting pair."""
    config = _with_options(copy.deepcopy(model.generation_config), tokenizer, options.num_beams,
                           options.forced_bos_token)
    sampling(config, options)
    limit = (getattr(options, "max_new_tokens", None) or config.max_new_tokens
             or (config.max_length - 1 if config.max_length else DEFAULT_GENERATION_MAX_LENGTH))
    if config.max_new_tokens is not None:
        config.max_new_tokens = limit
    else:
        config.max_length = limit + 1
    return config, limit


def sampling(config, options) -> None:
    """The sampling options (`do_sample`, `temperature`, `top_p`, `top_k`) that are set, into `config`."""
    for name in ("do_sample", "temperature", "top_p", "top_k"):
        value = getattr(options, name, None)
        if value is not None:
            setattr(config, name, value)


def _with_options(config, tokenizer, num_beams: int | None, forced_bos_token: str | None):
    """A generation config with these beams and forced first token (where given)."""
    if num_beams:
        config.num_beams = num_beams
        if num_beams == 1:  # beam-only settings (a checkpoint's own) make a greedy config invalid to save
            config.early_stopping = config.length_penalty = None
    if forced_bos_token:
        config.forced_bos_token_id = token_id(tokenizer, forced_bos_token)
    return config


def _warm_start(model: ModelRef, tokenizer, settings: Settings):
    """An `EncoderDecoderModel` whose encoder and decoder both start from the encoder-only checkpoint
    `model` (the decoder causal, with new cross-attention layers), as in "Leveraging Pre-trained
    Checkpoints for Sequence Generation Tasks" (Rothe et al., 2020)."""
    from transformers import AutoModel, AutoModelForCausalLM, EncoderDecoderModel

    kwargs = model_kwargs(settings)
    encoder = AutoModel.from_pretrained(model.path, **kwargs)
    decoder = AutoModelForCausalLM.from_pretrained(model.path, is_decoder=True, add_cross_attention=True, **kwargs)
    net = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"model {model.source!r}: its tokenizer needs CLS/BOS, SEP/EOS and PAD tokens to start "
                          "and end a generated sequence")
    net.config.decoder_start_token_id, net.config.pad_token_id = start, tokenizer.pad_token_id
    net.config.vocab_size = net.config.decoder.vocab_size
    net.generation_config.decoder_start_token_id, net.generation_config.eos_token_id = start, end
    net.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("%s is an encoder-only %s checkpoint: warm-starting an EncoderDecoderModel from it (encoder and "
             "decoder from its weights, new cross-attention; decoder start %d, end %d, pad %d)", model.source,
             encoder.config.model_type, start, end, tokenizer.pad_token_id)
    return net


class Seq2Seq(Recipe):
    """What translation and summarization share; a subclass names the task, its metrics and card."""

    predictor = Seq2SeqPredictor
    infer_options = Seq2SeqInferOptions
    train_options = Seq2SeqOptions
    model_class = "AutoModelForSeq2SeqLM"
    heads = ("ForConditionalGeneration", "MarianMTModel", "EncoderDecoderModel")
    train_defaults: ClassVar[dict] = {"epochs": 3.0, "batch_size": 16, "learning_rate": 5e-5}

    def prepare(self, dataset, src: str, options: Seq2SeqOptions, label_names):
        """`source` and `target` strings; a null, empty or non-text source or target is a `DataError`."""
        import datasets

        table = dataset.data.table
        require_columns(table, src, options)
        columns = {}
        for name, column in (("source", options.source_column), ("target", options.target_column)):
            values = table[column]
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                raise DataError(f"column {column!r} of {src!r} is {values.type}, not text")
            first_bad_row(pc.is_null(values), src, column, "is null")
            first_bad_row(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), src, column, "is empty")
            columns[name] = pc.cast(values, pa.string())
        features = datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string")})
        return datasets.Dataset(pa.table(columns)).cast(features), ()

    def tokenize(self, dataset, tokenizer, options: Seq2SeqOptions, max_length: int, split: str):
        """The prefixed source truncated to `max_length`, and labels: the target truncated to
        `generation_max_length` (run_translation.py's `preprocess_function`)."""
        if options.forced_bos_token:
            token_id(tokenizer, options.forced_bos_token)  # an unknown language code fails before training

        def encode(batch):
            inputs = tokenizer([options.source_prefix + s for s in batch["source"]], truncation=True,
                               max_length=max_length)
            labels = tokenizer(text_target=batch["target"], truncation=True, max_length=options.target_length)
            inputs["labels"] = labels["input_ids"]
            return inputs

        return dataset.map(encode, batched=True, batch_size=1000, remove_columns=["source", "target"],
                           desc="tokenize")

    def collator(self, tokenizer, model):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def model_for_training(self, model: ModelRef, label_names, settings: Settings):
        """A seq2seq checkpoint as it is; an encoder-only one (BERT, MiniLM, ...) warm-starts an
        `EncoderDecoderModel`. Embeddings grow to the tokenizer's vocabulary where it is larger."""
        from transformers import AutoConfig

        tokenizer = load_tokenizer(model, settings)
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=settings.trust_remote_code)
        if getattr(config, "is_encoder_decoder", False):
            net = load_model(model, self.model_class, settings)
        else:
            net = _warm_start(model, tokenizer, settings)
        if len(tokenizer) > net.get_input_embeddings().weight.shape[0]:
            net.resize_token_embeddings(len(tokenizer))
        if net.config.decoder_start_token_id is None and net.generation_config.decoder_start_token_id is None:
            raise ConfigError(f"model {model.source!r} has no decoder_start_token_id in its config")
        return net

    def training_arguments(self, options: Seq2SeqOptions, **kwargs):
        from transformers import Seq2SeqTrainingArguments

        args = Seq2SeqTrainingArguments(**kwargs, predict_with_generate=True,
                                        generation_max_length=options.target_length,
                                        generation_num_beams=options.num_beams)
        args.forced_bos_token = options.forced_bos_token  # `trainer` looks it up in the tokenizer
        return args

    def trainer(self, **kwargs):
        """A `Seq2SeqTrainer`; the model's generation config takes the options' length, beams and forced
        first token, so the saved model generates at inference as it was evaluated."""
        from transformers import Seq2SeqTrainer

        args, net = kwargs["args"], kwargs["model"]
        config = _with_options(net.generation_config, kwargs.get("processing_class"), args.generation_num_beams,
                               getattr(args, "forced_bos_token", None))
        config.max_new_tokens, config.max_length = None, args.generation_max_length
        return Seq2SeqTrainer(**kwargs)

    def postprocess(self, predictions, features, examples, tokenizer, model_config, label_names, options):
        """Generated ids and labels decoded without special tokens (-100 padding → pad token), stripped."""
        pad = tokenizer.pad_token_id or 0
        generated = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
        decoded = tokenizer.batch_decode(np.where(generated != -100, generated, pad), skip_special_tokens=True)
        labels = [[pad if t == -100 else t for t in row] for row in features["labels"]]
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return self._metric_form([p.strip() for p in decoded], [r.strip() for r in references])

    def _metric_form(self, predictions: list[str], references: list[str]) -> tuple[list, list]:
        raise NotImplementedError

    def detail_artifacts(self, details, label_names):
        return {"samples": ("table", details["samples"])}


class Translation(Seq2Seq):
    task = "translation"
    metrics: ClassVar[tuple[str, ...]] = ("bleu", "chrf")
    max_length = 128

    def _metric_form(self, predictions, references):
        return predictions, [[r] for r in references]  # sacreBLEU takes a list of references per row

    def compute_metrics(self, predictions, references, label_names, metrics):
        scores = compute(tuple(metrics), predictions, references)
        samples = [{"prediction": p, "reference": r[0]} for p, r in zip(predictions[:SAMPLES], references)]
        return {m: float(scores[m]) for m in metrics}, {"samples": samples}

    def card_text(self, label_names):
        return {"summary": "A translation model",
                "intended_use": "Translating sentences in the language pair and domain of the training data.",
                "limitations": (("BLEU and chrF on the eval set measure n-gram overlap with one reference, not "
                                 "adequacy: review translations before publishing them."),
                                ("Inputs longer than the training `max_length` are truncated; outputs stop at "
                                 "`generation_max_length` tokens."))}


def _lines(text: str) -> str:
    return "\n".join(_SENTENCE_END.split(text))


class Summarization(Seq2Seq):
    task = "summarization"
    metrics: ClassVar[tuple[str, ...]] = ("rougeLsum", "rouge1", "rouge2", "rougeL")
    max_length = 512

    def _metric_form(self, predictions, references):
        # rougeLsum scores sentence by sentence, one per line (run_summarization.py splits with nltk)
        return [_lines(p) for p in predictions], [_lines(r) for r in references]

    def compute_metrics(self, predictions, references, label_names, metrics):
        scores = compute(("rouge",), predictions, references)
        samples = [{"prediction": p, "reference": r} for p, r in zip(predictions[:SAMPLES], references)]
        return {m: float(scores[m]) for m in metrics}, {"samples": samples}

    def card_text(self, label_names):
        return {"summary": "A summarization model",
                "intended_use": "Summarizing texts like those of the training data, in their language and domain.",
                "limitations": (("Summaries may state things the input does not say; ROUGE measures word overlap "
                                 "with a reference, not faithfulness."),
                                ("Inputs longer than the training `max_length` are truncated, so later parts of "
                                 "long documents are not summarized."))}


class Text2TextGeneration(Recipe):
    """Whatever a sequence-to-sequence model writes for an input (T5-style task prefixes through
    `--source-prefix`, e.g. 'summarize: '): bulk inference only, with translation's predictor."""

    task = "text2text-generation"
    predictor = Seq2SeqPredictor
    infer_options = Seq2SeqInferOptions
    model_class = "AutoModelForSeq2SeqLM"
    heads = Seq2Seq.heads
