"""What one bulk-inference run is: the predictor it is handed, the columns its inputs come from, and
where its results go, checked against every input file's schema before any model is loaded. The job
knows nothing of tasks: what a row must hold and what a prediction is are the predictor's to say."""
from __future__ import annotations

from dataclasses import dataclass

from hfbatch.tasks.batch.results import ResultSet, predictor_key
from hfbatch.tasks.batch.shards import InputFile, Shard
from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.inputs import InputKind
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.predictor import PredictorSpec

ID_COLUMNS = ("id", "idx")
ROW_ID = "row_id"
PROVENANCE = ("model", "model_version")
BAD_ROW_POLICIES = ("fail", "quarantine")


@dataclass(frozen=True)
class InferSpec:
    """Everything a shard needs to run: the predictor, where its inputs come from, where results go."""

    predictor: PredictorSpec
    output: str
    inputs: tuple[tuple[str, str], ...]
    """(predictor input, input column) pairs, e.g. (("text", "sentence"),)."""
    keep_columns: tuple[str, ...] = ()
    batch_tokens: int | None = None
    """Token budget of one model batch; None: the predictor's default for its device."""
    on_bad_row: str = "fail"
    results: ResultSet | None = None
    """Where rows' results are looked up and added (`results.py`); None: every row is computed. Not part
    of the configuration: a reused result is the one the row would get."""

    @property
    def task(self) -> str:
        return self.predictor.task

    @property
    def settings(self) -> Settings:
        return self.predictor.settings

    @property
    def model(self) -> ModelRef:
        return self.predictor.model

    @property
    def model_name(self) -> str:
        return self.model.label

    @property
    def model_version(self) -> str:
        return model_version(self.model)

    @property
    def kinds(self) -> dict[str, InputKind]:
        """Each input's kind, as the predictor declares it."""
        return self.predictor.inputs()

    @property
    def config_key(self) -> str:
        """What the output depends on (not `batch_tokens`, which only changes speed)."""
        p = self.predictor
        return digest("infer", p.task, self.inputs, self.keep_columns, self.on_bad_row, p.options.model_dump(),
                      p.precision, p.model.fingerprint, p.model.tokenizer_fingerprint)

    def marker_key(self, shard: Shard) -> str:
        return digest("marker", shard.fingerprint, self.model_version, self.config_key)

    def storage_options(self, url: str) -> dict:
        return self.predictor.settings.storage_options(url)


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


def build_spec(predictor: PredictorSpec, output: str, files: list[InputFile], text_column: str = "text",
               columns: dict[str, str] | None = None, keep_columns: tuple[str, ...] | None = None,
               batch_tokens: int | None = None, on_bad_row: str = "fail", results: str | None = None) -> InferSpec:
    """Map the predictor's inputs to columns, check every input file's schema, and return the shard spec.

    Raises `ConfigError` or `DataError` naming the problem; reads only Parquet footers, so a missing
    column or wrong type is reported before any model is loaded. `results`: the store URL whose result
    entries the run reuses (its snapshot is taken when the run starts: `runner.open_results`).
    """
    kinds = predictor.inputs()
    mapping = {n: n for n in kinds}
    if "text" in kinds:
        mapping["text"] = text_column
    unknown = set(columns or {}) - set(kinds)
    if unknown:
        raise ConfigError(f"task {predictor.task} has inputs {list(kinds)}, not {sorted(unknown)}")
    mapping |= predictor.cls.input_columns(predictor.options) | (columns or {})
    first = files[0].arrow_schema(predictor.settings.storage_options(files[0].url))
    if keep_columns is None:
        keep_columns = tuple(c for c in ID_COLUMNS if c in first.names)[:1]
    reuse = None if results is None else ResultSet(results, predictor_key(predictor))
    spec = InferSpec(predictor, output.rstrip("/"), tuple((n, mapping[n]) for n in kinds), tuple(keep_columns),
                     batch_tokens, on_bad_row, reuse)
    reserved = {ROW_ID, *PROVENANCE, *predictor.output_schema().names}
    clash = reserved & set(spec.keep_columns)
    if clash:
        raise ConfigError(f"keep_columns {sorted(clash)} clash with output columns {sorted(reserved)}")
    for f in files:
        schema = first if f is files[0] else f.arrow_schema(spec.storage_options(f.url))
        for name, column in spec.inputs:
            if column not in schema.names:
                raise DataError(f"input file {f.url!r} has no column {column!r} (input {name!r} of {predictor.task}); "
                                f"columns: {schema.names}")
            kind = schema.field(column).type
            if not kinds[name].accepts(kind):
                raise DataError(f"column {column!r} of {f.url!r} is {kind}, not {kinds[name].description}")
        missing = [c for c in spec.keep_columns if c not in schema.names]
        if missing:
            raise DataError(f"input file {f.url!r} has no column(s) {missing} to keep; columns: {schema.names}")
    predictor.cls.check_checkpoint(predictor.model)
    return spec
