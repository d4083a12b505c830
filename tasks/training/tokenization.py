"""Tokenize: an ingested dataset → the recipe's model inputs (fast tokenizer, batched, truncated,
unpadded: padding is left to the collator)."""
from __future__ import annotations

from pathlib import Path

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.models import load_tokenizer
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import DatasetRef, ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import Recipe

TOKENIZE_VERSION = 2
SPLITS = ("train", "eval")


def tokenize_key(data: DatasetRef, model: ModelRef, task: str, options: Options, max_length: int,
                 split: str = "train", sample: tuple[int, int] | None = None) -> str:
    sampled = [list(sample)] if sample and sample[0] < data.num_rows else []  # all rows: the unsampled key
    return "tokenized/" + digest("tokenize", TOKENIZE_VERSION, data.fingerprint, model.tokenizer_fingerprint,
                                 task, options.model_dump(), max_length, split, *sampled)


def tokenize(data: DatasetRef, model: ModelRef, store: Store, recipe: Recipe, options: Options, settings: Settings,
             max_length: int = 128, split: str = "train", sample: tuple[int, int] | None = None) -> DatasetRef:
    """Tokenize `data` with `model`'s tokenizer as `recipe` does for `split` (`train` or `eval`); with
    `sample` (rows, seed), only that seeded sample of the rows (`--max-train-samples`: the rows training
    uses, the same ones it drew from the whole set before, and no others tokenized).

    Keyed by the input fingerprint, the tokenizer files' hash, the options, `max_length` and the sample.
    """
    if max_length < 8:
        raise ConfigError(f"max_length must be at least 8, got {max_length}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    key = tokenize_key(data, model, recipe.task, options, max_length, split, sample)

    def produce(tmp: Path) -> DatasetRef:
        tokenizer = load_tokenizer(model, settings)
        if not tokenizer.is_fast:
            raise ConfigError(f"model {model.source!r} has no fast tokenizer")
        limit = min(max_length, tokenizer.model_max_length)
        rows = store.load_dataset(data.key)
        if sample and sample[0] < rows.num_rows:
            rows = rows.shuffle(seed=sample[1]).select(range(sample[0]))
        tokenized = recipe.tokenize(rows, tokenizer, options, limit, split)
        tokenized.save_to_disk(str(tmp))
        return DatasetRef(store=store.url, key=key, fingerprint=key.rsplit("/", 1)[-1], num_rows=tokenized.num_rows,
                          label_names=data.label_names, source=data.source, task=data.task)

    return store.memoize(key, DatasetRef, produce)
