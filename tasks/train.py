"""Train: fine-tune a sequence classifier with `transformers.Trainer`, resumable from the store."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from .card import write_model_card
from .errors import ConfigError
from .fingerprint import digest
from .ingest import DatasetRef
from .models import ModelRef, load_classifier, load_tokenizer, pick_device
from .settings import get_settings
from .store import MARKER, Store

log = logging.getLogger(__name__)
TRAIN_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (all part of the run's cache key)."""

    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_train_samples: int | None = None
    seed: int = 42
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    save_steps: int = 200

    def validate(self) -> "TrainConfig":
        checks = [
            (self.epochs > 0, "epochs must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0 < self.learning_rate < 1, "learning_rate must be in (0, 1)"),
            (self.max_train_samples is None or self.max_train_samples >= 1, "max_train_samples must be >= 1"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.save_steps >= 1, "save_steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (got {self})")
        return self


@dataclass(frozen=True)
class TrainedModel:
    """A reference to a trained model in the store (`runs/<run_key>/model`)."""

    store: str
    key: str
    run_key: str
    base_model: str
    base_revision: str | None
    base_fingerprint: str
    dataset_fingerprint: str
    label_names: tuple[str, ...]
    config: dict
    device: str
    precision: str
    global_step: int
    resumed_from_step: int
    train_samples: int
    train_samples_per_second: float
    train_loss: float
    metrics: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.key}"

    def model_ref(self) -> ModelRef:
        from .models import _local_ref

        return _local_ref(self.uri, Store(self.store).local_dir(self.key))


def run_key(data: DatasetRef, model: ModelRef, config: TrainConfig) -> str:
    return digest("train", TRAIN_VERSION, data.fingerprint, model.fingerprint, asdict(config))


def train(data: DatasetRef, model: ModelRef, store: Store, config: TrainConfig) -> TrainedModel:
    """Fine-tune `model` on tokenized `data`; checkpoints go to the store and a rerun resumes from them."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    config.validate()
    key = run_key(data, model, config)
    model_key = f"runs/{key}/model"
    if store.is_complete(model_key):
        return _trained_from_meta(store.read_json(f"{model_key}/{MARKER}"))

    ckpt_key = f"runs/{key}/checkpoints"
    output_dir = Path(store.uri(ckpt_key)) if store.is_local else get_settings().cache_dir / "runs" / key
    resume = _last_checkpoint(store, ckpt_key, output_dir)
    resumed_from = int(resume.name.split("-")[-1]) if resume else 0
    if resume:
        log.info("resuming training from %s (step %d)", resume, resumed_from)

    ds = data.load()
    if config.max_train_samples and config.max_train_samples < ds.num_rows:
        ds = ds.shuffle(seed=config.seed).select(range(config.max_train_samples))
    device, precision = pick_device()
    set_seed(config.seed)
    tokenizer = load_tokenizer(model)
    net = load_classifier(model, data.label_names)
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio, seed=config.seed,
        data_seed=config.seed, save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        logging_steps=max(1, min(50, config.save_steps)), report_to=[], use_cpu=device == "cpu",
        bf16=precision == "bf16", fp16=precision == "fp16", dataloader_num_workers=0,
        disable_tqdm=not os.isatty(2),
    )
    trainer = Trainer(model=net, args=args, train_dataset=ds, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[_CheckpointCommit(store, ckpt_key)])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    torch_threads = torch.get_num_threads()

    trained = TrainedModel(
        store=store.url, key=model_key, run_key=key, base_model=model.source, base_revision=model.revision,
        base_fingerprint=model.fingerprint, dataset_fingerprint=data.fingerprint,
        label_names=data.label_names, config=asdict(config), device=device, precision=precision,
        global_step=trainer.state.global_step, resumed_from_step=resumed_from, train_samples=ds.num_rows,
        train_samples_per_second=float(result.metrics.get("train_samples_per_second", math.nan)),
        train_loss=float(result.metrics.get("train_loss", math.nan)),
    )
    log.info("trained %s in %d steps on %s/%s (%d torch threads)", key, trained.global_step, device,
             precision, torch_threads)
    with store.staging(model_key, meta=_meta(trained)) as tmp:
        trainer.save_model(str(tmp))  # model (safetensors) + tokenizer
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; keep the arguments as JSON
        (tmp / "training_args.json").write_text(args.to_json_string())
        (tmp / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        write_model_card(tmp, trained)
    return trained


def _meta(trained: TrainedModel) -> dict:
    return asdict(trained)


def _trained_from_meta(meta: dict) -> TrainedModel:
    return TrainedModel(**{**meta, "label_names": tuple(meta["label_names"])})


def _last_checkpoint(store: Store, ckpt_key: str, output_dir: Path) -> Path | None:
    """The newest committed checkpoint (marker present), fetched to `output_dir` if the store is remote."""
    done = [n for n in store.list(ckpt_key)
            if n.startswith("checkpoint-") and store.is_complete(f"{ckpt_key}/{n}")]
    if not done:
        return None
    newest = max(done, key=lambda n: int(n.split("-")[-1]))
    if store.is_local:
        return output_dir / newest
    local = output_dir / newest
    if not (local / MARKER).exists():
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(store.local_dir(f"{ckpt_key}/{newest}"), local)
    return local


class _CheckpointCommit(TrainerCallback):
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
