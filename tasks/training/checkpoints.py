"""Trainer checkpoints in the store: committed while training (marker last), and the newest one found
again to resume from after a crash (imported where training runs: it needs transformers)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

from hfbatch.tasks.core.store import MARKER, Store

log = logging.getLogger(__name__)


def last_checkpoint(store: Store, ckpt_key: str, output_dir: Path) -> Path | None:
    """The newest committed checkpoint (marker present), fetched to `output_dir` if the store is remote."""
    done = [n for n in store.list(ckpt_key)
            if n.startswith("checkpoint-") and store.is_complete(f"{ckpt_key}/{n}")]
    if not done:
        return None
    newest = max(done, key=lambda n: int(n.split("-")[-1]))
    local = output_dir / newest
    if not store.is_local and not (local / MARKER).exists():
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(store.local_dir(f"{ckpt_key}/{newest}"), local)
    return local


class CheckpointCommit(TrainerCallback):
    """After each Trainer save, commit the checkpoint to the store (marker last) and drop rotated ones.
    Runs after the Trainer's own flow callback, so it can veto the extra save at the end of training."""

    def __init__(self, store: Store, ckpt_key: str):
        self.store, self.ckpt_key = store, ckpt_key

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer also saves a checkpoint after the last step; the final model is committed right
        # after training, so that checkpoint (optimizer state included) would be written only to be dropped.
        if state.global_step >= state.max_steps and state.global_step % args.save_steps:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # under torchrun, the first process commits
            return
        name = f"checkpoint-{state.global_step}"
        key, meta = f"{self.ckpt_key}/{name}", {"global_step": state.global_step}
        if self.store.is_local:  # the Trainer wrote it in the store already
            self.store.write_json(f"{key}/{MARKER}", meta)
        else:
            self.store.commit_dir(Path(args.output_dir) / name, key, meta)
            kept = {p.name for p in Path(args.output_dir).glob("checkpoint-*")}
            for old in self.store.list(self.ckpt_key):
                if old.startswith("checkpoint-") and old not in kept:
                    self.store.remove(f"{self.ckpt_key}/{old}")
        log.info("checkpoint %s committed to %s", name, self.store.uri(self.ckpt_key))
