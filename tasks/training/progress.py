"""The Trainer's progress without a terminal: a line at a steady interval with steps of total, epoch,
samples/s, loss and time left, eval results as they come, and prediction batches of evaluation, in place of
the Trainer's printed log dicts (`PrinterCallback`). In a terminal, the Trainer's own bars stay."""
from __future__ import annotations

import time

from transformers import TrainerCallback

from hfbatch.tasks.core.progress import ProgressLog, run_logger


class TrainingProgress(TrainerCallback):
    def __init__(self, interval: float, label: str = "training"):
        self.interval, self.label = interval, label
        self.report: ProgressLog | None = None
        self.predicting: ProgressLog | None = None
        self.loss = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        self.first = state.global_step  # a resumed training's steps before this process
        self.started = time.monotonic()
        self.report = ProgressLog(self.label, state.max_steps, "steps", self.interval, first=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        results = {k: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if results and state.is_world_process_zero:
            run_logger().info("%s: evaluation at step %d: %s", self.label, state.global_step,
                                   ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in results.items()))

    def on_step_end(self, args, state, control, **kwargs):
        if self.report is None or not state.is_world_process_zero:
            return
        elapsed = time.monotonic() - self.started
        rows_per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        rate = (state.global_step - self.first) * rows_per_step / elapsed if elapsed > 0 else 0.0
        loss = f", loss {self.loss:.4f}" if self.loss == self.loss else ""  # none logged yet: NaN
        self.report.update(state.global_step, rate=f"{rate:.1f} samples/s",
                           extra=f"epoch {state.epoch or 0:.2f}/{args.num_train_epochs:g}{loss}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or eval_dataloader is None:
            return
        if self.predicting is None:
            label = self.label if self.label == "evaluation" else f"{self.label}: evaluation"
            # the clock starts after the first batch: its time is not in the rate
            self.predicting = ProgressLog(label, len(eval_dataloader), "batches", self.interval, first=1)
            self.done = 0
        self.done += 1
        self.predicting.update(self.done)

    def on_evaluate(self, args, state, control, **kwargs):
        self.predicting = None

    def on_predict(self, args, state, control, **kwargs):
        self.predicting = None
