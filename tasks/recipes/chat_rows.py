"""The rows of a text-generation source, checked: prompts (a column, or a template over the row's
columns), answers (texts, class labels or one assistant message), chats split into prompt and target,
and the canonical prepared rows. Each error names the source, row and column."""
from __future__ import annotations

from hfbatch.tasks.core import templates
from hfbatch.tasks.core.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def prompts(table, src: str, column: str | None, template: str | None) -> list[str]:
    """Each row's prompt: its `--prompt-column`, or `--prompt-template` rendered with its columns."""
    if template is None:
        column = str(column)
        values = table[column].to_pylist()
        for row, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                what = "empty" if isinstance(value, str) or value is None else type(value).__name__
                raise DataError(f"{src!r} row {row}: column {column!r} is {what}")
        return values
    names = templates.variables(template)
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DataError(f"data source {src!r} has no column {missing[0]!r} (read by --prompt-template); its columns "
                        f"are {table.column_names}")
    rendered = []
    for row, values in enumerate(table.select(list(names)).to_pylist()):
        null = next((n for n in names if values[n] is None), None)
        if null is not None:
            raise DataError(f"{src!r} row {row}: column {null!r} (read by --prompt-template) is null")
        try:
            prompt = templates.render(template, values)
        except ValueError as e:
            raise DataError(f"{src!r} row {row}: {e}") from None
        if not prompt.strip():
            raise DataError(f"{src!r} row {row}: the prompt template renders empty")
        rendered.append(prompt)
    return rendered


def answers(dataset, src: str, column: str) -> list[str]:
    """The answers of a column: texts, class labels (a `ClassLabel` column) as their names, or an
    assistant's message (TRL's conversational preference rows: a list of one `{role, content}`)."""
    import datasets

    values = dataset.data.table[column].to_pylist()
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        values = [None if v is None else feature.names[v] for v in values]
    texts = []
    for row, value in enumerate(values):
        if isinstance(value, list):
            if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
                raise DataError(f"{src!r} row {row}: column {column!r} is a list, but not of one assistant message")
            value = value[0].get("content")
        if not isinstance(value, str) or not value.strip():
            what = "empty" if isinstance(value, str) or value is None else type(value).__name__
            raise DataError(f"{src!r} row {row}: column {column!r} is {what}")
        texts.append(value)
    return texts


def prepared(columns: dict[str, list]):
    """The canonical rows: `prompt` (messages) and the answers (`completion`, and `rejected` for preferences)."""
    import datasets

    message = datasets.Features({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({"prompt": datasets.List(message),
                                  **{k: datasets.Value("string") for k in columns if k != "prompt"}})
    return datasets.Dataset.from_dict(columns, features=features)


def chat_prompt(chat, src: str, row: int, column: str) -> list[dict]:
    """A preference row's prompt: a chat that the answers continue (it does not end with the assistant)."""
    check_messages(chat, src, row, column)
    if chat[-1]["role"] == "assistant":
        raise DataError(f"{src!r} row {row}: the prompt chat ends with an assistant message; the chosen and "
                        "rejected answers are the assistant's turn")
    return [{"role": m["role"], "content": m["content"]} for m in chat]


def check_messages(chat, src: str, row: int, column: str) -> None:
    if not isinstance(chat, list) or not chat:
        raise DataError(f"{src!r} row {row}: column {column!r} is not a list of messages")
    for i, m in enumerate(chat):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{src!r} row {row}: message {i} of {column!r} is not a {{role, content}} message")
        if m.get("role") not in ROLES:
            raise DataError(f"{src!r} row {row}: message {i} has an unknown role {m.get('role')!r} "
                            f"(known: {list(ROLES)})")


def split_chat(chat, src: str, row: int, column: str) -> tuple[list[dict], str]:
    """A chat's prompt (every message but the last) and target (the last, an assistant message)."""
    check_messages(chat, src, row, column)
    if chat[-1]["role"] != "assistant":
        raise DataError(f"{src!r} row {row}: the chat does not end with an assistant message (the target)")
    if not chat[-1]["content"].strip():
        raise DataError(f"{src!r} row {row}: the final assistant message (the target) is empty")
    if len(chat) < 2:
        raise DataError(f"{src!r} row {row}: the chat has no prompt before its assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in chat[:-1]], chat[-1]["content"]
