"""Prompt templates: a Jinja2 template rendered with a row's columns as its variables, e.g.
`"Title: {{ title }}\\n{{ body }}"`, as vLLM's and Ray Data LLM's users write them.

Templates run in Jinja2's immutable sandbox (a template cannot reach Python internals or change its
inputs) with strict undefined variables: every name a template uses is a column the input must have,
known from the template alone before any row is read (`variables`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.cache
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def read_source(value: str, option: str) -> str:
    """An option's text: `@path` is the content of that file, anything else the text itself."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        return path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {option} file {str(path)!r}: {e.strerror or e}") from None


@functools.lru_cache(maxsize=64)
def compile_template(source: str):
    """The compiled template; a `ValueError` with Jinja2's message and the line where it does not parse."""
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"the template does not parse: {e.message} (line {e.lineno})") from None


@functools.lru_cache(maxsize=64)
def variables(source: str) -> tuple[str, ...]:
    """The names the template reads from a row (its undeclared variables), sorted; a `ValueError` where
    it does not parse or reads no column."""
    from jinja2 import TemplateSyntaxError, meta

    try:
        parsed = _environment().parse(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"the template does not parse: {e.message} (line {e.lineno})") from None
    names = tuple(sorted(meta.find_undeclared_variables(parsed)))
    if not names:
        raise ValueError("the template reads no column (write {{ column }} where a row's value goes)")
    return names


def render(source: str, row: dict[str, Any]) -> str:
    """The template with a row's values; raises `ValueError` saying why a row cannot be rendered."""
    from jinja2 import TemplateError

    try:
        return compile_template(source).render(**row)
    except TemplateError as e:
        raise ValueError(f"prompt template: {e}") from None
