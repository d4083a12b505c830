"""Translation and summarization: sequence-to-sequence models fine-tuned on (source, target) text pairs
as transformers' run_translation.py and run_summarization.py do it (an optional source prefix, labels
through `text_target=`, `Seq2SeqTrainer` evaluating with `generate`), scored with sacreBLEU's BLEU and
chrF (translation) or ROUGE (summarization) (in bulk: `predictors/seq2seq.py`).

Translation and summarization share one base recipe, `Seq2Seq`, that names no task (recipe discovery
skips it).
"""
from __future__ import annotations

import logging
import re
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.models import load_model, load_tokenizer, model_kwargs
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.generation import DEFAULT_MAX_NEW_TOKENS, GenerationOptions, token_id, with_search
from hfbatch.tasks.metrics import compute, paired
from hfbatch.tasks.predictors.seq2seq import Seq2SeqPredictor
from hfbatch.tasks.recipes.base import Recipe, first_bad_row, require_columns

log = logging.getLogger(__name__)

SAMPLES = 20
"""(prediction, reference) pairs kept in an evaluation's details."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Seq2SeqOptions(GenerationOptions):
    source_column: str = Field(description="column of the input text")
    target_column: str = Field(description="column of the reference translation or summary")
    generation_max_length: int | None = Field(None, ge=1, description="longest output in tokens, in training and "
                                              f"evaluation (default: {DEFAULT_MAX_NEW_TOKENS})")

    @property
    def target_length(self) -> int:
        return self.generation_max_length or DEFAULT_MAX_NEW_TOKENS


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
    net.config.vocab_size = decoder.config.vocab_size
    net.generation_config.decoder_start_token_id, net.generation_config.eos_token_id = start, end
    net.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("%s is an encoder-only %s checkpoint: warm-starting an EncoderDecoderModel from it (encoder and "
             "decoder from its weights, new cross-attention; decoder start %d, end %d, pad %d)", model.source,
             encoder.config.model_type, start, end, tokenizer.pad_token_id)
    return net


class Seq2Seq(Recipe[Seq2SeqOptions]):
    """What translation and summarization share; a subclass names the task, its metrics and card."""

    options_class = Seq2SeqOptions
    model_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    heads = Seq2SeqPredictor.heads
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

    def model_for_training(self, model: ModelRef, label_names, settings: Settings, **kwargs):
        """A seq2seq checkpoint as it is; an encoder-only one (BERT, MiniLM, ...) warm-starts an
        `EncoderDecoderModel`. Embeddings grow to the tokenizer's vocabulary where it is larger."""
        from transformers import AutoConfig

        tokenizer = load_tokenizer(model, settings)
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=settings.trust_remote_code)
        if getattr(config, "is_encoder_decoder", False):
            net = load_model(model, self.model_class, settings, **kwargs)
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
        args.forced_bos_token = options.forced_bos_token  # type: ignore[attr-defined]  # `trainer` reads it
        return args

    def trainer(self, options: Seq2SeqOptions | None = None, **kwargs):
        """A `Seq2SeqTrainer`; the model's generation config takes the options' length, beams and forced
        first token, so the saved model generates at inference as it was evaluated."""
        from transformers import Seq2SeqTrainer

        args, net = kwargs["args"], kwargs["model"]
        config = with_search(net.generation_config, kwargs.get("processing_class"), args.generation_num_beams,
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

    def row_statistics(self, predictions, references, label_names, metrics):
        return {m: paired.sacrebleu_stats(m, predictions, references) for m in metrics if m in ("bleu", "chrf")}

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

    def row_statistics(self, predictions, references, label_names, metrics):
        return paired.rouge_stats([m for m in metrics if m.startswith("rouge")], predictions, references)

    def card_text(self, label_names):
        return {"summary": "A summarization model",
                "intended_use": "Summarizing texts like those of the training data, in their language and domain.",
                "limitations": (("Summaries may state things the input does not say; ROUGE measures word overlap "
                                 "with a reference, not faithfulness."),
                                ("Inputs longer than the training `max_length` are truncated, so later parts of "
                                 "long documents are not summarized."))}
