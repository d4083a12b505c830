"""The README's command reference, generated from the CLI's parser (and so from the flows' parameters):

    .venv/bin/python -c "from hfbatch.flows.reference import commands_markdown; print(commands_markdown())"
"""
from __future__ import annotations

import argparse

from hfbatch.flows.cli import build_parser, unset


def commands_markdown() -> str:
    """The README's command reference: every command's options, from the parser (and so from the flows'
    parameters)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = []
    for command, sp in sub.choices.items():
        lines += [f"### `hfbatch {command}`", "", sp.description or _help_of(sub, command), "",
                  "| option | default | description |", "| --- | --- | --- |"]
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = " / ".join(f"`{o}`" for o in action.option_strings if not o.startswith("--no-")) \
                or f"`{action.metavar or action.dest}`"  # a positional argument
            shown = getattr(action, "shown_default", action.default)
            default = "required" if action.required else "" if unset(shown) else f"`{shown}`"
            choices = f" ({', '.join(map(str, action.choices))})" if action.choices else ""
            text = (action.help or "").replace(" (default: %(default)s)", "")
            if not unset(shown):
                text = text.replace(f" (default: {shown})", "")
            text = text.replace("|", "\\|")
            lines.append(f"| {flag} | {default} | {text}{choices} |")
        lines.append("")
    return "\n".join(lines)


def _help_of(sub: argparse._SubParsersAction, command: str) -> str:
    return next((a.help or "" for a in sub._choices_actions if a.dest == command), "")
