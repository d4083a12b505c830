"""Text generation in bulk: a decoder-only (causal) language model continues each row's text, or answers
each row's chat put through the tokenizer's chat template (`--messages-column`).

Each row's `generated_text` is what `pipeline("text-generation", return_full_text=False)` gives for it:
the prompt tokenized as the pipeline does (the tokenizer's special tokens; a chat with the generation
prompt, or continuing a final assistant message), the new tokens decoded without special tokens. The
generation engine (`engine/generation.py`) pads prompts on the left and gives each row the tokens
`model.generate` gives it alone. A prompt longer than the model's context leaves room for the output by
losing its beginning (the end, where the text continues, is kept); such rows are counted.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from pydantic import Field, field_validator

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.inputs import CHAT, TEXT
from hfbatch.tasks.engine.generation import GenerationInferOptions, GenerationPredictor, with_sampling, with_search

PROMPT_FILE = "hfbatch_prompt.json"
"""How a model fine-tuned by hfbatch was prompted in training (`prompt_format`), in its directory."""


def prompt_format(tokenizer) -> dict:
    """How prompts reach the model: through its chat template (`chat`, with the template's sha256) or as
    plain text (`text`, for a tokenizer without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return {"format": "text"}
    return {"format": "chat", "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()}


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """The token ids of each prompt (a list of messages) as the model sees it before its answer: the chat
    template with the generation prompt, or, without a template, the messages' texts one after another."""
    if getattr(tokenizer, "chat_template", None):
        chats = [[{"role": m["role"], "content": m["content"]} for m in p] for p in prompts]
        encoded = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)
        return [list(x) for x in encoded["input_ids"]]
    return tokenizer(["\n\n".join(m["content"] for m in p) for p in prompts])["input_ids"]


class TextGenerationOptions(GenerationInferOptions):
    messages_column: str | None = Field(None, description="column of chats (lists of {role, content} structs) to "
                                        "answer through the tokenizer's chat template, instead of --text-column")

    @field_validator("forced_bos_token")
    @classmethod
    def _decoder_only(cls, value):
        if value:
            raise ValueError("forced_bos_token is for encoder-decoder models (translation, text2text-generation), "
                             "not text-generation")
        return value


class TextGenerationPredictor(GenerationPredictor[TextGenerationOptions]):
    """The continuation of each row's text (or its chat's next assistant message), without the prompt."""

    task = "text-generation"
    heads = ("ForCausalLM", "LMHeadModel")
    options_class = TextGenerationOptions
    auto_class = "AutoModelForCausalLM"
    strip = False

    @classmethod
    def inputs(cls, options: TextGenerationOptions):
        return {"text": CHAT if options.messages_column else TEXT}

    @classmethod
    def input_columns(cls, options: TextGenerationOptions) -> dict[str, str]:
        return {"text": options.messages_column} if options.messages_column else {}

    def __init__(self, model, options, settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        if options.messages_column and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"model {model.source!r}: its tokenizer has no chat template, so --messages-column "
                              "cannot be used; give the prompts as text (--text-column)")
        self.tokenizer.truncation_side = "left"
        self.as_chat = self._trained_format(model) == "chat" and not options.messages_column

    def _trained_format(self, model) -> str | None:
        """The prompt format a model fine-tuned by hfbatch was trained with (`PROMPT_FILE`), checked against
        this tokenizer: a chat template changed since training is refused, not silently used."""
        path = Path(model.path) / PROMPT_FILE
        if not path.exists():
            return None
        trained = json.loads(path.read_text())
        found = prompt_format(self.tokenizer)
        if trained != found:
            raise ConfigError(f"model {model.source!r} was fine-tuned with prompts in format {trained} but its "
                              f"tokenizer now gives {found}: the chat template changed since training; restore "
                              f"the trained tokenizer files")
        return trained["format"]

    def _configure(self):
        """The model's generation config with the options; the new-token limit (the options', else the
        config's `max_new_tokens`, else its `max_length` less the prompt) and the longest prompt."""
        options, model = self.options, self.model
        config = with_sampling(with_search(copy.deepcopy(model.generation_config), self.tokenizer,
                                            options.num_beams, None), options)
        limits = [getattr(model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        context = min([x for x in limits if x and x < 1_000_000] or [1_000_000])
        self.max_new_tokens = options.max_new_tokens or config.max_new_tokens
        if self.max_new_tokens:
            config.max_new_tokens = self.max_new_tokens
            self.total = None
            self.max_length = context - self.max_new_tokens
            if self.max_length < 1:
                raise ConfigError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the "
                                  f"{context} tokens of {self.model_ref.source!r}")
        elif config.max_length is not None:  # the model's own total length, prompt included
            self.total = min(config.max_length, context)
            self.max_length = self.total - 1
        else:
            raise ConfigError(f"model {self.model_ref.source!r} sets no output length in its generation config "
                              "(max_new_tokens or max_length): give --max-new-tokens")
        return config

    def _encode(self, inputs):
        values = inputs["text"]
        if self.options.messages_column:
            ids = self._chats(values)
        elif self.as_chat:  # a chat model fine-tuned on prompts: each text is the user turn, as in training
            ids = self._chats([[{"role": "user", "content": self.options.source_prefix + t}] for t in values])
        else:
            ids = self._tokenize([self.options.source_prefix + t for t in values], self.max_length)
        if self.max_new_tokens:
            return ids, [self.max_new_tokens] * len(ids)
        return ids, [self.total - len(x) for x in ids]

    def _chats(self, chats: list[list[dict]]) -> list[list[int]]:
        """Each chat through the chat template as the pipeline renders it: with the generation prompt, or
        continuing a final assistant message; truncated (and counted) like text prompts."""
        ids: list = [None] * len(chats)
        cap, truncated = self.max_length, 0
        for continues in (False, True):
            rows = [i for i, c in enumerate(chats) if (c[-1]["role"] == "assistant") == continues]
            if not rows:
                continue
            messages = [[{"role": m["role"], "content": m["content"]} for m in chats[i]] for i in rows]
            kwargs = {"add_generation_prompt": not continues, "continue_final_message": continues,
                      "tokenize": True, "return_dict": True}
            encoded = self.tokenizer.apply_chat_template(messages, truncation=True, max_length=cap, **kwargs)
            full = [j for j, x in enumerate(encoded["input_ids"]) if len(x) >= cap]
            if full:
                whole = self.tokenizer.apply_chat_template([messages[j] for j in full], **kwargs)["input_ids"]
                truncated += sum(len(x) > cap for x in whole)
            for i, x in zip(rows, encoded["input_ids"]):
                ids[i] = list(x)
        self._count_truncated(truncated, len(chats), cap)
        return ids
