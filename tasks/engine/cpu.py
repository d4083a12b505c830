"""The CPU tuning of bulk inference, in one place. `tune_cpu` applies it to the process, once; bulk
inference does so when it loads a predictor (`PredictorSpec.load`: `hfbatch infer`, the `batch_inference`
flow and its shard tasks on any worker). Nothing is changed at import, and a predictor used without it
(a test, a notebook) runs its batches one after another in the calling thread, with torch's threads.

- Streams (`streams.py`): as many batches at once as torch had threads, each on one thread. While the
  streams run, torch's intra-op thread count (one setting for the whole process) is 1, and set back
  when none runs.
- Memory (`allocator.py`): glibc's malloc keeps freed memory inside the process instead of unmapping
  every large activation (`mallopt`), and hands it back when a shard is done or the RSS has grown by
  more than 256 MB (`malloc_trim`).
- oneDNN's primitive caches (`onednn.py` fills them, one compiled primitive per input shape): capped
  at `PRIMITIVE_CACHE` entries each, read by oneDNN when it makes its first primitive (so before any
  model runs); a user's own setting wins.

What each is worth: `benchmarks/RESULTS.md`.
"""
from __future__ import annotations

import functools
import os

from hfbatch.tasks.engine.streams import Streams

PRIMITIVE_CACHE = "64"
"""oneDNN (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and torch's ideep (LRU_CACHE_CAPACITY) each keep up to
1,024 compiled primitives by default, ~0.3 MB each: bulk inference meets a new shape at almost every
batch (its rows x padded length), and the process grew by ~600 MB until both were full. 64 each keep
the shapes of a few batches in a row."""


@functools.cache
def tune_cpu() -> Streams:
    """Tune this process for bulk inference on its CPU (the first call; later calls return the same
    streams)."""
    import torch

    from hfbatch.tasks.engine.allocator import keep_freed_memory

    for cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(cache, PRIMITIVE_CACHE)
    keep_freed_memory()
    return Streams(torch.get_num_threads())


def streams() -> Streams | None:
    """The process's streams once `tune_cpu` ran, else None (batches run in the calling thread)."""
    return tune_cpu() if tune_cpu.cache_info().currsize else None
