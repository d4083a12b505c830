"""Constrained decoding: every generated answer is one of a set of choices, matches a regular expression,
is a JSON document valid against a schema, or is a sentence of a grammar, by construction.

The constraint is compiled by llguidance (the engine behind vLLM's `guidance` backend and llama.cpp's
grammars; chosen by measurement: `benchmarks/grammar_libs.py`, figures in `benchmarks/RESULTS.md`): once
per run into a grammar, checked before any work; once per model into a matcher, which each row copies. At
every decoding step each constrained row's matcher gives the tokens it allows next (a bitmask over the
vocabulary), every other token's logit becomes -inf before the search chooses, and the chosen token
advances the matcher. An end token is allowed only where the answer is complete, so a row that reaches its
new-token limit first ends with `finish_reason = "length"` and an incomplete answer.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hfbatch.tasks.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

KINDS = ("choices", "regex", "json_schema", "grammar")
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON answers are laid out as `json.dumps` writes them: free whitespace lets a small model spend its
tokens on blank lines (SmolLM2-135M-Instruct's answers ran into the token limit that way). A schema's own
`x-guidance` settings override it."""


@dataclass(frozen=True)
class Constraint:
    """What every answer must be: `kind` (one of `KINDS`) and its source text (the choices as a JSON
    list, the pattern, the schema as JSON, the Lark or GBNF grammar)."""

    kind: str
    source: str

    @property
    def flag(self) -> str:
        return f"--{self.kind.replace('_', '-')}"

    def grammar(self) -> str:
        """llguidance's grammar of the constraint, compiled once per process for each content (the run's
        plan checks it, each worker's predictor compiles it again); a `ValueError` naming the problem where
        it cannot be compiled (an invalid pattern, an unsupported JSON Schema keyword, an undefined rule)."""
        return _grammar(self)

    def _compile(self) -> str:
        import llguidance
        from llguidance import LLMatcher

        if self.kind == "choices":  # literal alternatives (Lark strings are JSON strings)
            choices = json.loads(self.source)
            grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        elif self.kind == "regex":
            grammar = LLMatcher.grammar_from_regex(self.source)
        elif self.kind == "json_schema":
            _check_schema(self.source)
            grammar = LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_LAYOUT)  # type: ignore[arg-type]
        else:
            try:
                grammar = llguidance.grammar_from("grammar", self.source)
            except ValueError as e:
                raise ValueError(first_line(str(e))) from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise ValueError(self._describe(messages[0]))
        return grammar

    def _describe(self, message: str) -> str:
        """llguidance's compile error in the option's words."""
        unimplemented = re.match(r"Unimplemented keys: \[(.*)\]", message)
        if unimplemented:
            return (f"the schema uses JSON Schema keyword(s) {unimplemented.group(1)}, which llguidance cannot "
                    "enforce (the README lists what it supports)")
        if self.kind == "regex":
            return "invalid pattern: " + first_line(message.split("error: ", 1)[-1])
        return first_line(message)


@functools.lru_cache(maxsize=32)
def _grammar(constraint: Constraint) -> str:
    return constraint._compile()


def _check_schema(source: str) -> None:
    """A `ValueError` where `source` is not JSON or not a valid JSON Schema (draft 2020-12)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ValueError(f"not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else "")) from None


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


class Guide:
    """A compiled constraint for one tokenizer and vocabulary: hands out a matcher per row, masks a batch's
    logits by its rows' matchers, and advances them by the chosen tokens."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, eos: list[int]):
        import llguidance
        import llguidance.hf

        self.vocab_size = vocab_size
        try:
            grammar = constraint.grammar()
        except ValueError as e:
            raise ConfigError(f"{constraint.flag}: {e}") from None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.prototype = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self.prototype.is_error():
            raise ConfigError(f"{constraint.flag}: {first_line(self.prototype.get_error())}")
        self.words = (vocab_size + 31) // 32

    def matcher(self):
        """A new row's matcher, at the start of the answer."""
        return self.prototype.deep_copy()

    def mask(self, scores: torch.Tensor, matchers: list) -> None:
        """Set to -inf, in place, the scores (one row per matcher) of the tokens each row's matcher does
        not allow next. The bits are unpacked by numpy: llguidance's torch helper compiles a kernel with
        torch.compile (a C++ toolchain and seconds of warm-up on a CPU), and numpy's `unpackbits` was the
        fastest of the ways measured (`benchmarks/grammar_libs.py`)."""
        import torch

        bits = np.empty((len(matchers), self.words), dtype=np.int32)
        for j, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(bits[j].ctypes.data, self.words * 4)
            if matcher.is_error():
                raise RuntimeError(f"constraint matcher failed: {matcher.get_error()}")
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : scores.shape[-1]]
        scores.masked_fill_(torch.from_numpy(allowed == 0), -torch.inf)

    @staticmethod
    def advance(matchers: list, tokens: list[int]) -> None:
        """Each row's matcher past its chosen token (a finished one, which allowed only an end token, as it is)."""
        for matcher, token in zip(matchers, tokens):
            if not matcher.is_stopped():
                matcher.consume_token(token)


# --- the typed JSON column -------------------------------------------------------------------------------
def json_column(schema: dict) -> tuple[Any, Any]:
    """The Arrow type of answers valid against `schema` and a function turning a parsed answer into a value
    of it: strings, integers, numbers, booleans, enums, arrays and objects with `properties` map to Arrow
    types (a struct per object); a part that does not (a `$ref`, `anyOf`, an object without properties) is
    kept as its JSON text; a whole answer that does not is its JSON text."""
    import pyarrow as pa

    found = _arrow(schema)
    return found if found is not None else (pa.string(), _json_text)


def _json_text(value):
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _arrow(schema: Any) -> tuple[Any, Any] | None:
    import pyarrow as pa

    if not isinstance(schema, dict):
        return None
    values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if values is not None:
        if all(isinstance(v, str) for v in values):
            return pa.string(), _same
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return pa.int64(), _same
        return None
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"]
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    scalars = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
    if kind in scalars:
        return scalars[kind], (_number if kind == "number" else _same)
    if kind == "array" and isinstance(schema.get("items"), dict):
        item = _arrow(schema["items"])
        arrow, fit = item if item is not None else (pa.string(), _json_text)
        return pa.list_(arrow), lambda v: None if v is None else [fit(x) for x in v]
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
        fields = {name: _arrow(sub) or (pa.string(), _json_text) for name, sub in schema["properties"].items()}
        struct = pa.struct([(name, arrow) for name, (arrow, _) in fields.items()])
        return struct, lambda v: None if v is None else {k: fit(v.get(k)) for k, (_, fit) in fields.items()}
    return None


def _same(value):
    return value


def _number(value):
    return None if value is None else float(value)
