"""Keep the memory torch frees on the CPU inside the process, instead of handing it back to the kernel.

glibc's malloc serves a request over its mmap threshold (at most 32 MiB on 64-bit, however it adapts)
with a fresh `mmap` and unmaps it on `free`. An encoder's large activations are over it: MiniLM's
feed-forward output for a batch of 8,192 tokens is 8,192 × 1,536 × 4 bytes = 48 MiB. Every such
tensor then comes back from the kernel page by page, each page faulted in and zeroed, at every layer
of every batch. This is why PyTorch's CPU performance guides recommend jemalloc or tcmalloc; hfbatch
gets the same effect inside the process, without `LD_PRELOAD`, by raising glibc's thresholds with
`mallopt`: requests up to `MMAP_THRESHOLD` come from the heap, and up to `TRIM_THRESHOLD` of freed
memory stays in it for the next batch. The cost is resident memory: the heap grows until freed blocks
fit the next requests (torch's aligned allocations do not always fit the block just freed), then
stays. So that what it holds does not creep up from shard to shard (each thread's arena keeps its own
largest batch), `release_freed_memory` hands the free part back to the kernel when a shard is done,
and `cap_freed_memory`, before each CPU batch, when the RSS grew by more than `FREE_CAP` since the last
trim (the arenas' fragments grow with the number of batches otherwise, and the peak with them).
Time and memory measured: `benchmarks/RESULTS.md`.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
TOP_PAD = 64 << 20
FREE_CAP = 256 << 20
"""RSS growth (bytes) since the last trim above which the heap's free memory goes back before a batch."""
_baseline: list[int] = []  # the RSS after the last trim (or at the first batch)
_kept: list[bool] = []  # [True] once `keep_freed_memory` changed malloc's thresholds


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (once per process: `mallopt` is idempotent,
    so two threads racing here is harmless); True where it did (Linux with glibc), False elsewhere,
    where nothing changes. Called by `cpu.tune_cpu`; until then the functions below do nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        _ = libc.gnu_get_libc_version  # glibc's own symbol: musl's mallopt accepts these and ignores them
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    kept = all(mallopt(option, value) == 1 for option, value in settings)
    _kept[:] = [kept]
    return kept


def release_freed_memory() -> None:
    """Give the memory the heap holds but no object uses back to the kernel (glibc's `malloc_trim`, all
    arenas), where `keep_freed_memory` kept it: after each shard, and by `cap_freed_memory`."""
    if _kept == [True]:
        ctypes.CDLL(None).malloc_trim(0)
        _baseline[:] = [_rss()]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cap_freed_memory(limit: int = FREE_CAP) -> bool:
    """Before a CPU batch: where `keep_freed_memory` keeps freed memory and the process's RSS has grown
    by more than `limit` bytes since the last trim, give the heap's free memory back (`malloc_trim`).
    Returns whether it did. The RSS is the measure because what glibc counts as free stays free after a
    trim (only its pages go back): a trim is needed only where memory came back in and was freed again."""
    if _kept != [True]:
        return False
    rss = _rss()
    if not _baseline:
        _baseline.append(rss)
    if rss - _baseline[0] <= limit:
        return False
    release_freed_memory()
    return True
