"""Content fingerprints: stable SHA-256 digests of JSON-able values and of files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def digest(*parts) -> str:
    """A short, stable hex digest of JSON-serialisable parts (order matters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def hash_files(paths: list[Path]) -> str:
    """Digest of the names and bytes of `paths` (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]
