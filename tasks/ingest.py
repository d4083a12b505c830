"""Ingest: a data source → a labelled `datasets` Arrow dataset in the store, keyed by content."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import sources
from .errors import DataError
from .fingerprint import digest
from .store import MARKER, Store

INGEST_VERSION = 1


@dataclass(frozen=True)
class DatasetRef:
    """A reference to a committed Arrow dataset in the store: what tasks pass to each other."""

    store: str
    key: str
    fingerprint: str
    num_rows: int
    label_names: tuple[str, ...]
    source: str

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.key}"

    @classmethod
    def from_meta(cls, meta: dict) -> "DatasetRef":
        return cls(**{**meta, "label_names": tuple(meta["label_names"])})

    def load(self):
        """Load the dataset (memory-mapped Arrow) from the store."""
        import datasets

        return datasets.load_from_disk(str(Store(self.store).local_dir(self.key)))


def ingest_key(source_fingerprint: str, text_column: str, label_column: str,
               label_names: tuple[str, ...] | None) -> str:
    return "datasets/" + digest("ingest", INGEST_VERSION, source_fingerprint, text_column, label_column,
                                list(label_names) if label_names else None)


def ingest(src: str, store: Store, text_column: str = "text", label_column: str = "label",
           label_names: tuple[str, ...] | None = None, source_fingerprint: str | None = None) -> DatasetRef:
    """Read `src`, keep its text and label columns as `text` / `label` (a `ClassLabel`), commit it.

    `label_names` fixes the label set (an eval set must use its training set's); otherwise it comes
    from the data (`ClassLabel` names, else the sorted distinct values). Idempotent: an already
    committed ingest of the same content and mapping is returned without reading the source.
    """
    source = sources.parse_source(src)
    fp = source_fingerprint or sources.fingerprint(source)
    key = ingest_key(fp, text_column, label_column, label_names)
    if store.is_complete(key):
        return DatasetRef.from_meta(store.read_json(f"{key}/{MARKER}"))

    ds = sources.load(source)
    table, names = labelled_table(ds.data.table, ds.features, src, text_column, label_column, label_names)
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(names))})
    out = datasets.Dataset(table.replace_schema_metadata(None)).cast(features)
    ref = DatasetRef(store=store.url, key=key, fingerprint=key.rsplit("/", 1)[-1],
                     num_rows=out.num_rows, label_names=tuple(names), source=src)
    with store.staging(key, meta=asdict(ref)) as tmp:
        out.save_to_disk(str(tmp))
    return ref


def labelled_table(table: pa.Table, features, src: str, text_column: str, label_column: str,
                   label_names: tuple[str, ...] | None) -> tuple[pa.Table, tuple[str, ...]]:
    """Validate and map one source table to (`text`: string, `label`: int64 id) plus the label names."""
    if table.num_rows == 0:
        raise DataError(f"data source {src!r} is empty (0 rows)")
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in table.column_names:
            raise DataError(f"data source {src!r} has no column {col!r} ({flag}); "
                            f"its columns are {table.column_names}")
    text = table[text_column]
    if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
        raise DataError(f"column {text_column!r} of {src!r} is {text.type}, not text")
    _first_bad_row(pc.is_null(text), src, text_column, "is null")
    _first_bad_row(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), src, text_column, "is empty")

    labels = table[label_column]
    _first_bad_row(pc.is_null(labels), src, label_column, "is null")
    source_names = getattr(features.get(label_column), "names", None) if features is not None else None
    if source_names is not None:  # ClassLabel ids → their names
        labels = pc.take(pa.array(source_names), labels)
    elif pa.types.is_integer(labels.type) or pa.types.is_boolean(labels.type):
        labels = pc.cast(labels, pa.string())
    elif pa.types.is_large_string(labels.type):
        labels = pc.cast(labels, pa.string())
    elif not pa.types.is_string(labels.type):
        raise DataError(f"column {label_column!r} of {src!r} is {labels.type}; labels must be names or ids")
    if label_names is None:
        distinct = pc.unique(labels).to_pylist()
        if source_names is not None:
            label_names = tuple(source_names)
        elif all(v.lstrip("-").isdigit() for v in distinct):
            label_names = tuple(str(v) for v in sorted(int(v) for v in distinct))
        else:
            label_names = tuple(sorted(distinct))
    ids = pc.index_in(labels, value_set=pa.array(list(label_names)))
    bad = pc.is_null(ids)
    if pc.any(bad).as_py():
        row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src!r} row {row}: unknown label {labels[row].as_py()!r} in column "
                        f"{label_column!r} (known labels: {list(label_names)})")
    out = pa.table({"text": pc.cast(text, pa.string()), "label": pc.cast(ids, pa.int64())})
    return out, tuple(label_names)


def _first_bad_row(mask, src: str, column: str, what: str) -> None:
    if pc.any(mask).as_py():
        row = int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src!r} row {row}: column {column!r} {what}")


def holdout(data: DatasetRef, store: Store, fraction: float = 0.1, seed: int = 42) -> tuple[DatasetRef, DatasetRef]:
    """Split an ingested dataset into (train, eval) parts, stratified by label, deterministically."""
    if not 0 < fraction < 1:
        raise DataError(f"eval fraction must be in (0, 1), got {fraction}")
    refs = []
    keys = {part: "datasets/" + digest("holdout", data.fingerprint, fraction, seed, part) for part in ("train", "eval")}
    if all(store.is_complete(k) for k in keys.values()):
        return tuple(DatasetRef.from_meta(store.read_json(f"{k}/{MARKER}")) for k in keys.values())
    ds = data.load()
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError:  # a class too small to stratify
        parts = ds.train_test_split(test_size=fraction, seed=seed)
    for part, split in (("train", "train"), ("eval", "test")):
        key = keys[part]
        ref = DatasetRef(store=store.url, key=key, fingerprint=key.rsplit("/", 1)[-1],
                         num_rows=parts[split].num_rows, label_names=data.label_names,
                         source=f"{data.source}#{part}")
        with store.staging(key, meta=asdict(ref)) as tmp:
            parts[split].flatten_indices().save_to_disk(str(tmp))
        refs.append(ref)
    return tuple(refs)
