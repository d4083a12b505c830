"""Content fingerprints: stable digests of JSON-able values and of files, local or remote."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec

from .errors import DataError


def digest(*parts) -> str:
    """A short, stable hex digest of JSON-serialisable parts (order matters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _update(h, path: str | Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def hash_files(paths: list[Path]) -> str:
    """Digest of the names and bytes of local `paths` (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        _update(h, p)
    return h.hexdigest()[:32]


def file_fingerprint(fs: fsspec.AbstractFileSystem, path: str, url: str | None = None) -> str:
    """Content fingerprint of one file: its bytes when local, its ETag (or fsspec's `ukey`) and size on
    an object store, which never reads the object. `url` names the file in the error if it is missing."""
    h = hashlib.sha256()
    try:
        if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
            _update(h, path)
        else:
            info = fs.info(path)
            h.update(f"{info.get('ETag') or info.get('etag') or fs.ukey(path)}:{info.get('size')}".encode())
    except FileNotFoundError as e:
        raise DataError(f"input file {url or path!r} does not exist") from e
    return h.hexdigest()[:32]
