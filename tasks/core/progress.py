"""Progress of a long step as a log line at a steady interval (for runs without a terminal: under a scheduler
or a Prefect worker), and the libraries' own progress bars and load reports held back unless asked for."""
from __future__ import annotations

import logging
import os
import time


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Where a step's progress and the warnings worth a user's eye go: the Prefect run's logger inside a flow
    or task run (the UI and the worker's log), else `hfbatch.progress` (shown at INFO on stderr where the
    process set up no logging of its own)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() or TaskRunContext.get():
        return get_run_logger()
    log = logging.getLogger("hfbatch.progress")
    if not logging.getLogger().handlers and not log.handlers:
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    return log


def duration(seconds: float) -> str:
    """`1h02m`, `4m05s`, `12s`."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLog:
    """`done` of `total` units of a step, logged at most every `interval` seconds (and at the end) as
    `training: 120/375 steps (32%), 41.3 samples/s, 2m05s left`."""

    def __init__(self, label: str, total: int, unit: str, interval: float, first: int = 0, clock=time.monotonic):
        self.label, self.total, self.unit, self.interval, self.clock = label, total, unit, interval, clock
        self.first = first  # done before this process started (a resumed training): not in the rate
        self.started = self.last = clock()
        self.log = run_logger()

    def update(self, done: int, rate: str | None = None, extra: str = "", force: bool = False) -> str | None:
        """Log the line if `interval` passed since the last (or `force`, or the end); returns it. `rate`:
        what to say of the speed (default: units per second since the start)."""
        now = self.clock()
        if not (force or done >= self.total or now - self.last >= self.interval):
            return None
        self.last = now
        elapsed = now - self.started
        speed = (done - self.first) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / speed if speed > 0 else float("nan")
        line = (f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%), "
                f"{rate or f'{speed:.1f} {self.unit}/s'}"
                + (f", {duration(left)} left" if done < self.total and left == left else
                   f", done in {duration(elapsed)}" if done >= self.total else "")
                + (f", {extra}" if extra else ""))
        self.log.info(line)
        return line


def quiet_libraries(verbose: bool) -> None:
    """Hold back the libraries' progress bars (datasets' "Map" / "Saving the dataset", transformers'
    "Loading weights", the Hub's downloads) and transformers' load reports and warnings, unless `verbose` or
    their own settings (`HF_DATASETS_DISABLE_PROGRESS_BARS`, `TRANSFORMERS_VERBOSITY`,
    `HF_HUB_DISABLE_PROGRESS_BARS`) say otherwise."""
    if verbose:
        return
    import datasets
    import huggingface_hub
    import transformers

    if "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ:
        datasets.disable_progress_bars()
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.logging.set_verbosity_error()
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        transformers.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
