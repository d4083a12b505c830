"""Shard claims: runs that write one output at the same time compute each shard once.

Before computing a shard a run creates `_claims/<marker key>.json` (created only if absent: a hard link
on a local store, a conditional PUT on S3), naming its owner (host, process, run), and removes it once
the shard's marker is written. A run that finds a shard claimed by another live run leaves it for later
(`wait=False`) and, once it has done every other shard, waits for that shard's marker. A claim is live
while its process runs (on the same host) and its lease has not run out: the owner renews it while it
computes. A claim left by a process that died is taken over, so a crash never blocks an output.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from hfbatch.tasks.core.store import Store

LEASE_S = 120.0
"""How long a claim holds without renewal (renewed every third of it while the shard computes)."""
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Claims:
    """The shard claims of one output (`out`), taken as `owner`."""

    def __init__(self, out: Store, owner: str = OWNER, lease_s: float = LEASE_S):
        self.out, self.owner, self.lease_s = out, owner, lease_s

    def _key(self, key: str) -> str:
        return f"_claims/{key}.json"

    def _record(self) -> dict:
        host, pid, _ = self.owner.split(":")
        return {"owner": self.owner, "host": host, "pid": int(pid), "expires": time.time() + self.lease_s}

    def acquire(self, key: str) -> bool:
        """Claim `key`: True if it is now this owner's, False if another live owner holds it. A stale claim
        (its process gone, or its lease run out) is taken over."""
        for _ in range(2):
            if self.out.create_json(self._key(key), self._record()):
                return True
            try:
                held = self.out.read_json(self._key(key))
            except (FileNotFoundError, ValueError):  # released (or being written) meanwhile: try again
                continue
            if held.get("owner") == self.owner:
                return True
            if _live(held):
                return False
            self.out.remove(self._key(key))  # stale: take it over
        return False

    def release(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.out.remove(self._key(key))

    @contextlib.contextmanager
    def holding(self, key: str) -> Iterator[None]:
        """Renew the claim on `key` while the block runs; release it at the end, however it ends."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 3):
                with contextlib.suppress(Exception):  # a failed renewal only shortens the lease
                    self.out.write_json(self._key(key), self._record())

        thread = threading.Thread(target=renew, name="hfbatch-claim", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(key)


def _live(claim: dict) -> bool:
    """Whether the claim's owner may still be computing: lease not run out, and on this host its process runs."""
    if time.time() > float(claim.get("expires", 0)):
        return False
    pid = int(claim.get("pid", 0))
    if claim.get("host") == socket.gethostname() and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError):
            return True
    return True
