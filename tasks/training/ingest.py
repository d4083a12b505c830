"""Ingest: a data source → the task recipe's canonical Arrow columns in the store, keyed by content."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hfbatch.tasks.core import sources
from hfbatch.tasks.core.errors import DataError, InputChangedError
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import DatasetRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import Recipe

INGEST_VERSION = 2


def ingest_key(source_fingerprint: str, task: str, options: Options,
               label_names: tuple[str, ...] | None = None) -> str:
    return "datasets/" + digest("ingest", INGEST_VERSION, source_fingerprint, task, options.ingest_key(),
                                list(label_names) if label_names else None)


def ingest(src: str, store: Store, recipe: Recipe, options: Options, settings: Settings,
           label_names: tuple[str, ...] | None = None, source_fingerprint: str | None = None) -> DatasetRef:
    """Read `src` and commit it in the recipe's canonical columns (`Recipe.prepare`).

    `label_names` fixes the label set (an eval set must use its training set's). Idempotent: an already
    committed ingest of the same content and mapping is returned without reading the source.
    """
    fs_options = settings.storage_options(src)
    source = sources.parse_source(src, fs_options)
    fp = source_fingerprint or sources.fingerprint(source, fs_options)
    key = ingest_key(fp, recipe.task, options, label_names)

    def produce(tmp: Path) -> DatasetRef:
        loaded = sources.load(source, fs_options)
        if source.kind == "file" and sources.fingerprint(source, fs_options) != fp:
            raise InputChangedError(f"data source {src!r} changed after this run planned it (rewritten while it "
                                    "was read): nothing was ingested; rerun once it is stable")
        prepared, names = recipe.prepare(loaded, src, options, label_names)
        prepared.save_to_disk(str(tmp))
        return DatasetRef(store=store.url, key=key, fingerprint=key.rsplit("/", 1)[-1], num_rows=prepared.num_rows,
                          label_names=tuple(names or ()), source=src, task=recipe.task)

    return store.memoize(key, DatasetRef, produce)


def plan_source(src: str, options: Options, settings: Settings) -> str:
    """Before any work: `src` exists and (where that is cheap to see) has the columns `options` name;
    returns its content fingerprint (file bytes, S3 ETags or hub revision), the ingest task's key, so
    an unchanged source is never read again."""
    fs_options = settings.storage_options(src)
    source = sources.parse_source(src, fs_options)
    columns = sources.peek_columns(source, fs_options)
    missing = {field: column for field, column in options.columns().items() if column not in (columns or [column])}
    if missing:
        field, column = next(iter(missing.items()))
        raise DataError(f"data source {src!r} has no column {column!r} (--{field.replace('_', '-')}); "
                        f"its columns are {columns}")
    return sources.fingerprint(source, fs_options)


def _check_stratifiable(ds, column: str, data: DatasetRef, fraction: float) -> None:
    """Every class needs 2 rows to be in both parts, and the held-out part a row of each class."""
    counts = np.bincount(np.asarray(ds[column]), minlength=len(data.label_names))
    small = [(n, int(c)) for n, c in zip(data.label_names, counts) if 0 < c < 2]
    if small:
        raise DataError(f"{data.source!r}: class {small[0][0]!r} has {small[0][1]} row: too few to hold some out "
                        "for evaluation (at least 2 per class), or give --eval-dataset")
    if fraction * counts.sum() < (counts > 0).sum():
        raise DataError(f"{data.source!r}: {fraction:.0%} of {int(counts.sum())} rows cannot hold one row of each of "
                        f"its {(counts > 0).sum()} classes; raise --eval-fraction or give --eval-dataset")


def holdout_key(data: DatasetRef, fraction: float, seed: int) -> str:
    """The key of a split; its parts are `datasets/<digest of it and the part>`."""
    return digest("holdout", data.fingerprint, fraction, seed)


def holdout(data: DatasetRef, store: Store, recipe: Recipe, fraction: float = 0.1, seed: int = 42
            ) -> tuple[DatasetRef, DatasetRef]:
    """Split an ingested dataset into (train, eval) parts, deterministically, stratified by the recipe's
    `stratify_by` column where every class is large enough."""
    if not 0 < fraction < 1:
        raise DataError(f"eval fraction must be in (0, 1), got {fraction}")
    split: dict = {}

    def parts():
        if not split:
            ds = store.load_dataset(data.key)
            if recipe.stratify_by:
                _check_stratifiable(ds, recipe.stratify_by, data, fraction)
            try:
                split.update(ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column=recipe.stratify_by))
            except ValueError as e:
                raise DataError(f"cannot hold out {fraction:.0%} of {data.source!r} for evaluation: {e}; "
                                "give --eval-dataset") from e
        return split

    refs: list[DatasetRef] = []
    for part, name in (("train", "train"), ("eval", "test")):
        key = "datasets/" + digest(holdout_key(data, fraction, seed), part)

        def produce(tmp: Path, key=key, name=name, part=part) -> DatasetRef:
            ds = parts()[name].flatten_indices()
            ds.save_to_disk(str(tmp))
            return DatasetRef(store=store.url, key=key, fingerprint=key.rsplit("/", 1)[-1], num_rows=ds.num_rows,
                              label_names=data.label_names, source=f"{data.source}#{part}", task=data.task)

        refs.append(store.memoize(key, DatasetRef, produce))
    return refs[0], refs[1]
