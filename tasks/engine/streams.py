"""CPU inference on several single-threaded streams instead of one stream of multi-threaded ops.

torch splits each op over its intra-op threads. Parts of an encoder's forward pass do not split well
on a CPU: a dynamic int8 linear layer finds its input's range and quantizes it on one thread
(fbgemm), and the many small ops (layer norms, GELU, softmax, bias adds) pay a fork and join on
every call. Running as many batches at once as torch has threads, each batch on one thread, keeps
every core busy through those parts: the "throughput streams" of OpenVINO, or the several instances
of the PyTorch CPU performance guides, here inside one process and sharing one copy of the model
(what it gains: `benchmarks/RESULTS.md`).

torch's intra-op thread count is one setting for the whole process (setting it from any thread
changes it for all), so `Streams.map` sets it to 1 while any map runs and back to what it was when
none does. Other torch work in the process at the same time runs single-threaded meanwhile.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Streams:
    """A pool of `count` threads that run work items with torch single-threaded."""

    def __init__(self, count: int):
        self.count = count
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="hfbatch-stream") if count > 1 else None
        self._lock = threading.Lock()
        self._running = 0
        self._threads = 0
        """torch's thread count before the first running map: set back when the last one ends."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`fn` of each item, `count` items at a time, results in item order (with one stream: in the
        calling thread, one map at a time, torch untouched). Put the costliest items first, so that the
        streams end together."""
        if self._pool is None:
            with self._lock:
                return [fn(item) for item in items]
        with self._single_threaded():
            futures = [self._pool.submit(fn, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                wait(futures)  # none still runs once torch's thread count is set back
                raise

    @contextmanager
    def _single_threaded(self):
        import torch

        with self._lock:
            if self._running == 0:
                self._threads = torch.get_num_threads()
                torch.set_num_threads(1)
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    torch.set_num_threads(self._threads)
