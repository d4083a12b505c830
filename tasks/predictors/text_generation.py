"""Text generation in bulk: a decoder-only (causal) language model continues each row's text, answers
each row's chat put through the tokenizer's chat template (`--messages-column`), or answers the prompt a
Jinja2 template makes of the row's columns (`--prompt-template`: with a chat template, the user turn after
`--system-prompt`). A constraint (`--choices`, `--regex`, `--json-schema`, `--grammar`: `engine/constraints.py`)
makes every answer valid by construction; with a schema the output also has a typed `generated_json`.

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
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from hfbatch.tasks.core import templates
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.inputs import CHAT, TEXT, VALUE
from hfbatch.tasks.core.options import Options, validated
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.engine.constraints import Constraint, json_column
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


class PromptOptions(Options):
    """How a row becomes a prompt (in bulk inference, training and evaluation alike)."""

    prompt_template: str | None = Field(None, description="Jinja2 template of the prompt over the row's columns, "
                                        "e.g. 'Title: {{ title }}' (or @FILE); with a chat template, the user turn")
    system_prompt: str | None = Field(None, description="system message before each prompt, or @FILE (with a chat "
                                      "template; else the text before the prompt)")

    @field_validator("prompt_template", "system_prompt", mode="before")
    @classmethod
    def _read_prompt(cls, value, info):
        return templates.read_source(value, f"--{info.field_name.replace('_', '-')}") if isinstance(value, str) \
            else value

    @field_validator("prompt_template")
    @classmethod
    def _parses(cls, value):
        if value is not None:
            templates.variables(value)
        return value


class ConstraintOptions(Options):
    """What every answer must be: at most one of a set of choices, a pattern, a JSON Schema, a grammar."""

    choices: tuple[str, ...] | None = Field(None, description="every answer is exactly one of these")
    regex: str | None = Field(None, description="every answer matches this pattern in full (Rust regex syntax: "
                              "no look-around or back-references)")
    json_schema: str | None = Field(None, description="every answer is JSON valid against this schema: a file (or "
                                    "@FILE) or the schema's JSON text; adds the typed column generated_json")
    grammar: str | None = Field(None, description="every answer is a sentence of this Lark or GBNF grammar: a file "
                                "(or @FILE) or its text")

    @field_validator("json_schema", "grammar", mode="before")
    @classmethod
    def _read_constraint(cls, value, info):
        """A file's content (`FILE` or `@FILE`), or the text itself where it is a schema or a grammar (a
        schema starts with `{`; a grammar's rules hold `:`)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        is_text = text.startswith("{") if info.field_name == "json_schema" else ":" in text
        if not value.startswith("@") and not is_text:
            value = "@" + value
        return templates.read_source(value, f"--{info.field_name.replace('_', '-')}")

    @field_validator("choices")
    @classmethod
    def _distinct(cls, value):
        if value is not None:
            if not value:
                raise ValueError("give at least one choice")
            if any(not c for c in value):
                raise ValueError("a choice is empty")
            twice = sorted({c for c in value if value.count(c) > 1})
            if twice:
                raise ValueError(f"duplicate choice(s) {twice}")
        return value

    @model_validator(mode="after")
    def _compiles(self):
        given = [k for k in ("choices", "regex", "json_schema", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one constraint, not {', '.join('--' + k.replace('_', '-') for k in given)}")
        constraint = self.constraint()
        if constraint is not None:
            try:
                constraint.grammar()
            except ValueError as e:
                raise ValueError(f"{constraint.flag}: {e}") from None
        return self

    def constraint(self) -> Constraint | None:
        """The constraint these options give, if any."""
        if self.choices is not None:
            return Constraint("choices", json.dumps(list(self.choices)))
        for kind in ("regex", "json_schema", "grammar"):
            if getattr(self, kind) is not None:
                return Constraint(kind, getattr(self, kind))
        return None


class TextGenerationOptions(PromptOptions, ConstraintOptions, GenerationInferOptions):
    messages_column: str | None = Field(None, description="column of chats (lists of {role, content} structs) to "
                                        "answer through the tokenizer's chat template, instead of --text-column")

    @field_validator("forced_bos_token")
    @classmethod
    def _decoder_only(cls, value):
        if value:
            raise ValueError("forced_bos_token is for encoder-decoder models (translation, text2text-generation), "
                             "not text-generation")
        return value

    @model_validator(mode="after")
    def _one_prompt(self):
        if self.messages_column and self.prompt_template is not None:
            raise ValueError("give --prompt-template or --messages-column, not both")
        if self.messages_column and self.system_prompt is not None:
            raise ValueError("--system-prompt is for --prompt-template and text prompts: a chat of "
                             "--messages-column carries its own system message")
        constraint = self.constraint()
        if constraint is not None and self.num_beams and self.num_beams > 1:
            raise ValueError(f"{constraint.flag} decodes greedily or by sampling, not with beam search: "
                             "drop --num-beams")
        return self


class TextGenerationPredictor(GenerationPredictor[TextGenerationOptions]):
    """The continuation of each row's text (or its chat's next assistant message), without the prompt."""

    task = "text-generation"
    heads = ("ForCausalLM", "LMHeadModel")
    options_class = TextGenerationOptions
    auto_class = "AutoModelForCausalLM"
    strip = False

    @classmethod
    def inputs(cls, options: TextGenerationOptions):
        if options.prompt_template is not None:
            return dict.fromkeys(templates.variables(options.prompt_template), VALUE)
        return {"text": CHAT if options.messages_column else TEXT}

    @classmethod
    def input_columns(cls, options: TextGenerationOptions) -> dict[str, str]:
        if options.prompt_template is not None:  # a template's names are its columns (not --text-column)
            return {name: name for name in templates.variables(options.prompt_template)}
        return {"text": options.messages_column} if options.messages_column else {}

    @classmethod
    def output_schema(cls, options: TextGenerationOptions) -> pa.Schema:
        schema = super().output_schema(options)
        if options.json_schema is not None:
            schema = schema.append(pa.field("generated_json", json_column(json.loads(options.json_schema))[0]))
        return schema

    @classmethod
    def for_model(cls, model: ModelRef, options: TextGenerationOptions) -> tuple[TextGenerationOptions, list[str]]:
        """The prompt template and system prompt a model fine-tuned with them was trained with, each where
        the options give none; a note of what was taken, and of one given that differs (used as given)."""
        trained = read_prompt_file(model)
        if trained.get("prompt_template") is None or options.messages_column:
            return options, []
        fields = [k for k in ("prompt_template", "system_prompt") if trained.get(k) is not None]
        taken = {k: trained[k] for k in fields if getattr(options, k) is None}
        notes = [f"{' and '.join(k.replace('_', ' ') for k in taken)} as {model.source} was trained with"] if taken \
            else []
        notes += [f"{k.replace('_', ' ')} differs from the one {model.source} was trained with; using the one given"
                  for k in fields if k not in taken and getattr(options, k) != trained[k]]
        return validated(type(options), options.model_dump() | taken), notes

    def __init__(self, model, options, settings, precision: str = "auto"):
        super().__init__(model, options, settings, precision)
        if options.messages_column and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"model {model.source!r}: its tokenizer has no chat template, so --messages-column "
                              "cannot be used; give the prompts as text (--text-column)")
        self.tokenizer.truncation_side = "left"
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.as_chat = not options.messages_column and chat and (
            self._trained_format(model) == "chat" or options.prompt_template is not None
            or options.system_prompt is not None)
        """Each prompt text becomes the user turn of a chat (after the system prompt)."""
        self.json_fit = json_column(json.loads(options.json_schema))[1] if options.json_schema is not None else None

    def _guide(self):
        constraint = self.options.constraint()
        if constraint is None:
            return None
        from hfbatch.tasks.engine.constraints import Guide

        eos = self.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [self.tokenizer.eos_token_id])
        return Guide(constraint, self.tokenizer, self.model.get_output_embeddings().weight.shape[0], eos)

    def _more_columns(self, texts: list[str], reasons: list[str]) -> dict[str, pa.Array]:
        """`generated_json`: each complete answer parsed and typed by the schema; null where the answer
        was cut at the new-token limit (`finish_reason` `length`), never a partial document."""
        if self.json_fit is None:
            return {}
        values = [self.json_fit(json.loads(t)) if reason == "eos" else None for t, reason in zip(texts, reasons)]
        return {"generated_json": pa.array(values, self.schema.field("generated_json").type)}

    def _trained_format(self, model) -> str | None:
        """The prompt format a model fine-tuned by hfbatch was trained with (`PROMPT_FILE`), checked against
        this tokenizer: a chat template changed since training is refused, not silently used."""
        trained = read_prompt_file(model)
        if not trained:
            return None
        found = prompt_format(self.tokenizer)
        if {k: trained.get(k) for k in found} != found:
            raise ConfigError(f"model {model.source!r} was fine-tuned with prompts in format {trained} but its "
                              f"tokenizer now gives {found}: the chat template changed since training; restore "
                              f"the trained tokenizer files")
        return trained["format"]

    def problem(self, row: dict[str, Any]) -> str | None:
        if self.options.prompt_template is None:
            return None
        try:
            prompt = templates.render(self.options.prompt_template, row)
        except ValueError as e:
            return str(e)
        return None if prompt.strip() else "the prompt template renders empty"

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
        options = self.options
        if options.prompt_template is not None:
            names = list(inputs)
            values = [templates.render(options.prompt_template, dict(zip(names, row))) for row in zip(*inputs.values())]
        else:
            values = inputs["text"]
        if options.messages_column:
            ids = self._chats(values)
        elif self.as_chat:  # each text is the user turn (a template's prompt, or as the model was fine-tuned)
            system = [{"role": "system", "content": options.system_prompt}] if options.system_prompt else []
            ids = self._chats([[*system, {"role": "user", "content": options.source_prefix + t}] for t in values])
        else:
            system = options.system_prompt + "\n\n" if options.system_prompt else ""
            ids = self._tokenize([system + options.source_prefix + t for t in values], self.max_length)
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


def read_prompt_file(model: ModelRef) -> dict:
    """How a model fine-tuned by hfbatch was prompted (`PROMPT_FILE`), or {} for any other model."""
    path = Path(model.path) / PROMPT_FILE
    return json.loads(path.read_text()) if path.exists() else {}
