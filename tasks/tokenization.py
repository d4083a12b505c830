"""Tokenize: an ingested dataset → token ids (fast tokenizer, batched, truncated, unpadded)."""
from __future__ import annotations

from dataclasses import asdict

from .errors import ConfigError
from .fingerprint import digest
from .ingest import DatasetRef
from .models import ModelRef, load_tokenizer
from .store import MARKER, Store

TOKENIZE_VERSION = 1


def tokenize_key(data: DatasetRef, model: ModelRef, max_length: int) -> str:
    return "tokenized/" + digest("tokenize", TOKENIZE_VERSION, data.fingerprint,
                                 model.tokenizer_fingerprint, max_length)


def tokenize(data: DatasetRef, model: ModelRef, store: Store, max_length: int = 128) -> DatasetRef:
    """Tokenize `data` with `model`'s tokenizer; padding is left to the collator at train time.

    Keyed by the input fingerprint, the tokenizer files' hash and `max_length`; the `datasets`
    fingerprint of the map is set to the same key, so its Arrow cache is reused as well.
    """
    if max_length < 8:
        raise ConfigError(f"max_length must be at least 8, got {max_length}")
    key = tokenize_key(data, model, max_length)
    if store.is_complete(key):
        return DatasetRef.from_meta(store.read_json(f"{key}/{MARKER}"))
    tokenizer = load_tokenizer(model)
    if not tokenizer.is_fast:
        raise ConfigError(f"model {model.source!r} has no fast tokenizer")
    max_length = min(max_length, tokenizer.model_max_length)
    ds = data.load()
    fp = key.rsplit("/", 1)[-1]
    tokenized = ds.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                       batched=True, batch_size=1000, remove_columns=["text"], new_fingerprint=fp,
                       desc="tokenize")
    ref = DatasetRef(store=store.url, key=key, fingerprint=fp, num_rows=tokenized.num_rows,
                     label_names=data.label_names, source=data.source)
    with store.staging(key, meta=asdict(ref)) as tmp:
        tokenized.save_to_disk(str(tmp))
    return ref
