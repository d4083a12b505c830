"""Watch a data prefix for new or changed files: the plain functions behind the `watch_data` flow.

What a prefix held when last seen is kept in the store at `watch/<prefix digest>.json`, so a change is
reported once, whichever process or machine looks next.
"""
from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec

from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.sources import BUILDERS, Source, fingerprint, parse_source
from hfbatch.tasks.core.store import Store

EVENT = "hfbatch.dataset.updated"


def scan(prefix: str, options: dict[str, Any] | None = None) -> dict[str, str]:
    """`{file URI: content fingerprint}` of the data files (CSV, JSON, Parquet) under `prefix`; empty
    while the prefix holds none (an object-store prefix exists only once a file is in it).
    `options`: fsspec storage options."""
    fs, root = fsspec.core.url_to_fs(prefix, **(options or {}))
    if not fs.exists(root) or not any(Path(f).suffix.lower() in BUILDERS for f in fs.find(root)):
        return {}
    source = parse_source(prefix, options)
    return {f: fingerprint(Source("file", f, (f,)), options) for f in source.files}


def resource_id(prefix: str) -> str:
    """The Prefect resource of a watched prefix: what a retrain trigger matches on."""
    return f"hfbatch.dataset.{prefix.rstrip('/')}"


def state_key(prefix: str) -> str:
    return f"watch/{digest('watch', prefix.rstrip('/'))[:32]}.json"


def changes(store: Store, prefix: str, files: dict[str, str]) -> dict:
    """What differs from the last recorded state: `added`, `changed` and `removed` file URIs, and the
    fingerprint of the prefix's whole content now (the event's identity)."""
    seen = store.read_json(state_key(prefix))["files"] if store.exists(state_key(prefix)) else {}
    return {"prefix": prefix, "fingerprint": digest("prefix", sorted(files.items())), "files": len(files),
            "added": sorted(set(files) - set(seen)),
            "changed": sorted(f for f in files if f in seen and seen[f] != files[f]),
            "removed": sorted(set(seen) - set(files))}


def record(store: Store, prefix: str, files: dict[str, str]) -> None:
    store.write_json(state_key(prefix), {"prefix": prefix, "files": files,
                                         "seen_at": datetime.now(UTC).isoformat()})


def event_id(change: dict) -> uuid.UUID:
    """The same content gives the same event id, so a re-emitted event (a crash between emitting and
    recording) is recognisably the same one."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"hfbatch:{change['prefix']}:{change['fingerprint']}")
