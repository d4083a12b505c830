"""What one bulk-inference run is: task, model, inputs, options and where its results go, checked
against every input file's schema before any model is loaded."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.recipes import Options, get_recipe
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.predictor import PRECISIONS
from hfbatch.tasks.batch.shards import InputFile, Shard, read_footer

ID_COLUMNS = ("id", "idx")
ROW_ID = "row_id"
PROVENANCE = ("model", "model_version")
BAD_ROW_POLICIES = ("fail", "quarantine")
STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())


@dataclass(frozen=True)
class InferSpec:
    """Everything a shard needs to run: task, model, where its inputs come from, where results go."""

    task: str
    model: ModelRef
    output: str
    inputs: tuple[tuple[str, str], ...]
    """(logical input, input column) pairs, e.g. (("text", "sentence"),)."""
    options: Options
    """The recipe's inference options."""
    settings: Settings
    keep_columns: tuple[str, ...] = ()
    batch_tokens: int | None = None
    """Token budget of one model batch; None: the predictor's default for its device."""
    on_bad_row: str = "fail"
    precision: str = "auto"
    chat_inputs: tuple[str, ...] = ()
    """Inputs that are chats (lists of {role, content} structs), not strings."""

    @property
    def model_name(self) -> str:
        return self.model.label

    @property
    def model_version(self) -> str:
        return model_version(self.model)

    @property
    def config_key(self) -> str:
        """What the output depends on (not `batch_tokens`, which only changes speed)."""
        return digest("infer", self.task, self.inputs, self.keep_columns, self.on_bad_row, self.options.model_dump(),
                      self.precision, self.model.fingerprint, self.model.tokenizer_fingerprint)

    def marker_key(self, shard: Shard) -> str:
        return digest("marker", shard.fingerprint, self.model_version, self.config_key)

    def storage_options(self, url: str) -> dict:
        return self.settings.storage_options(url)


def is_chat(kind: pa.DataType) -> bool:
    """A list of structs with string `role` and `content` fields (or a column of nulls)."""
    if pa.types.is_null(kind):
        return True
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return False
    fields = {f.name: f.type for f in kind.value_type}
    return all(fields.get(name) in STRING_TYPES for name in ("role", "content"))


def model_version(model: ModelRef) -> str:
    """Registry version, hub revision, or (for a plain directory) the weights' fingerprint."""
    return str(model.version or model.revision or f"sha256:{model.fingerprint[:16]}")


def output_for(output: str, model: ModelRef, day: str) -> str:
    """`output` with its `{date}` and `{model_version}` placeholders filled in: a scheduled run writes
    where its day and model say (an output holds one model version's results)."""
    try:
        return output.format(date=day, model_version=model_version(model))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"output {output!r}: only {{date}} and {{model_version}} can be filled in ({e})") from e


def build_spec(task: str, model: ModelRef, output: str, files: list[InputFile], settings: Settings,
               options: Options | None = None, text_column: str = "text", columns: dict[str, str] | None = None,
               keep_columns: list[str] | tuple[str, ...] | None = None, batch_tokens: int | None = None,
               on_bad_row: str = "fail", precision: str = "auto") -> InferSpec:
    """Validate the parameters and every input file's schema, and return the shard spec.

    Raises `ConfigError` or `DataError` naming the problem; reads only Parquet footers, so a missing
    column or wrong type is reported before any model is loaded.
    """
    recipe = get_recipe(task)
    options = options if options is not None else recipe.infer_options()
    recipe.predictor.check(options)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ConfigError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
    names = recipe.predictor.inputs
    mapping = {n: n for n in names}
    if "text" in names:
        mapping["text"] = text_column
    unknown = set(columns or {}) - set(names)
    if unknown:
        raise ConfigError(f"task {recipe.task} has inputs {list(names)}, not {sorted(unknown)}")
    mapping |= recipe.predictor.input_columns(options) | (columns or {})
    chats = tuple(recipe.predictor.chat_inputs(options))
    first = read_footer(files[0].url, settings.storage_options(files[0].url)).schema.to_arrow_schema()
    if keep_columns is None:
        keep_columns = [c for c in ID_COLUMNS if c in first.names][:1]
    spec = InferSpec(recipe.task, model, output.rstrip("/"), tuple((n, mapping[n]) for n in names), options,
                     settings, tuple(keep_columns), batch_tokens, on_bad_row, precision, chats)
    reserved = {ROW_ID, *PROVENANCE, *recipe.predictor.output_schema(options).names}
    clash = reserved & set(spec.keep_columns)
    if clash:
        raise ConfigError(f"keep_columns {sorted(clash)} clash with output columns {sorted(reserved)}")
    for f in files:
        schema = first if f is files[0] else read_footer(f.url, settings.storage_options(f.url)).schema.to_arrow_schema()
        for name, column in spec.inputs:
            if column not in schema.names:
                raise DataError(f"input file {f.url!r} has no column {column!r} (input {name!r} of {recipe.task}); "
                                f"columns: {schema.names}")
            kind = schema.field(column).type
            if name in chats:
                if not is_chat(kind):
                    raise DataError(f"column {column!r} of {f.url!r} is {kind}, not a chat: a list of "
                                    "{role: string, content: string} structs")
            elif kind not in STRING_TYPES:
                raise DataError(f"column {column!r} of {f.url!r} is {kind}, not a string")
        missing = [c for c in spec.keep_columns if c not in schema.names]
        if missing:
            raise DataError(f"input file {f.url!r} has no column(s) {missing} to keep; columns: {schema.names}")
    recipe.check_checkpoint(model)
    return spec
