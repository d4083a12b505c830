"""The kinds of input a predictor reads from a row: what the batch job checks in the input's schema
before any model is loaded, and in every value before it reaches the model.

A predictor declares its inputs as `{name: kind}` (`Predictor.inputs`); the batch job maps each name to
a column, checks the column's Arrow type with `accepts`, sets aside (or fails on) values `problem`
refuses, and hands the predictor the column's values as `values` gives them. A new kind of input (an
image, a vector of features) is a new subclass, in the module of the predictor that reads it.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())


class InputKind:
    """A kind of input value. `description` completes "column C is T, not ..." in an error."""

    description = "a value"

    def accepts(self, kind: pa.DataType) -> bool:
        raise NotImplementedError

    def problem(self, value: Any, column: str) -> str | None:
        """Why a row's value of `column` (not null: the batch job refuses those first) cannot be
        predicted, or None."""
        return None

    def values(self, column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        """The column as the predictor reads it."""
        return column


class Text(InputKind):
    """A non-empty string."""

    description = "a string"

    def accepts(self, kind: pa.DataType) -> bool:
        return kind in STRING_TYPES

    def problem(self, value: Any, column: str) -> str | None:
        if not isinstance(value, str):
            return f"non-string {column!r} ({type(value).__name__})"
        return f"empty {column!r}" if not value.strip() else None

    def values(self, column):
        return column.cast(pa.string())


class Chat(InputKind):
    """A chat: a non-empty list of `{role, content}` structs with string values."""

    description = "a chat: a list of {role: string, content: string} structs"

    def accepts(self, kind: pa.DataType) -> bool:
        if pa.types.is_null(kind):
            return True
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
            return False
        fields = {f.name: f.type for f in kind.value_type}
        return all(fields.get(name) in STRING_TYPES for name in ("role", "content"))

    def problem(self, value: Any, column: str) -> str | None:
        if not value:
            return f"empty {column!r}"
        if not isinstance(value, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            return f"{column!r}: messages are not a list of {{role, content}} with string values"
        return None


class Value(InputKind):
    """Any value: a prompt template's variable (a string, a number, a list, a struct...)."""

    description = "any value"

    def accepts(self, kind: pa.DataType) -> bool:
        return True


TEXT = Text()
CHAT = Chat()
VALUE = Value()
