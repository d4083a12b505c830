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
                 split: str = "train") -> str:
    return "tokenized/" + digest("tokenize", TOKENIZE_VERSION, data.fingerprint, model.tokenizer_fingerprint,
                                 task, options.model_dump(), max_length, split)


def tokenize(data: DatasetRef, model: ModelRef, store: Store, recipe: Recipe, options: Options, settings: Settings,
             max_length: int = 128, split: str = "train") -> DatasetRef:
    """Tokenize `data` with `model`'s tokenizer as `recipe` does for `split` (`train` or `eval`).

    Keyed by the input fingerprint, the tokenizer files' hash, the options and `max_length`.
    """
    if max_length < 8:
        raise ConfigError(f"max_length must be at least 8, got {max_length}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    key = tokenize_key(data, model, recipe.task, options, max_length, split)

    def produce(tmp: Path) -> DatasetRef:
        tokenizer = load_tokenizer(model, settings)
        if not tokenizer.is_fast:
            raise ConfigError(f"model {model.source!r} has no fast tokenizer")
        limit = min(max_length, tokenizer.model_max_length)
        tokenized = recipe.tokenize(store.load_dataset(data.key), tokenizer, options, limit, split)
        tokenized.save_to_disk(str(tmp))
        return DatasetRef(store=store.url, key=key, fingerprint=key.rsplit("/", 1)[-1], num_rows=tokenized.num_rows,
                          label_names=data.label_names, source=data.source, task=data.task)

    return store.memoize(key, DatasetRef, produce)
