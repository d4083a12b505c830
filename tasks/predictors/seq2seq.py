"""Sequence-to-sequence generation in bulk (translation, summarization, text2text-generation): each row's
`generated_text` as `model.generate` gives it for that row alone, by the generation engine
(`engine/generation.py`)."""
from __future__ import annotations

from hfbatch.tasks.engine.generation import GenerationInferOptions, GenerationPredictor, seq2seq_generation_config


class Seq2SeqPredictor(GenerationPredictor[GenerationInferOptions]):
    """The model's generation config plus the options (`source_prefix`, `forced_bos_token`, `num_beams`,
    `max_new_tokens`, sampling); `output_tokens` counts the new tokens up to and with the end token,
    `finish_reason` is `eos`, or `length` when the output reached `max_new_tokens` (also where the model
    forces an end token there). Inputs are truncated to what the encoder takes."""

    auto_class = "AutoModelForSeq2SeqLM"
    heads = ("ForConditionalGeneration", "MarianMTModel", "EncoderDecoderModel")

    def _configure(self):
        config, self.max_new_tokens = seq2seq_generation_config(self.model, self.tokenizer, self.options)
        encoder = self.model.get_encoder().config
        limits = [self.tokenizer.model_max_length, getattr(encoder, "max_position_embeddings", None)]
        self.max_length = min([x for x in limits if x and x < 1_000_000] or [1024])
        """Longest input, in tokens."""
        return config

    def _encode(self, inputs):
        ids = self._tokenize([self.options.source_prefix + t for t in inputs["text"]], self.max_length)
        return ids, [self.max_new_tokens] * len(ids)


class TranslationPredictor(Seq2SeqPredictor):
    task = "translation"


class SummarizationPredictor(Seq2SeqPredictor):
    task = "summarization"


class Text2TextGenerationPredictor(Seq2SeqPredictor):
    """Whatever a sequence-to-sequence model writes for an input (T5-style task prefixes through
    `--source-prefix`, e.g. 'summarize: ')."""

    task = "text2text-generation"
