"""Train: fine-tune a model with the task recipe's `Trainer`, resumable from the store."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hfbatch.tasks.core.card import write_model_card
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.models import load_tokenizer, pick_device
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import DatasetRef, ModelRef, TrainedModel
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import Recipe, get_recipe

log = logging.getLogger(__name__)
TRAIN_VERSION = 1


DEFAULTS = {"epochs": 1.0, "batch_size": 32, "learning_rate": 5e-5, "weight_decay": 0.0, "warmup_ratio": 0.0}
"""Hyperparameters of a task whose recipe does not choose its own (`Recipe.train_defaults`)."""


class TrainConfig(BaseModel):
    """Training hyperparameters (all part of the run's cache key). Those left None take the task's
    defaults (`Recipe.train_defaults`, then `DEFAULTS`): `resolved`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: float | None = Field(None, gt=0, description="training epochs, a fraction trains part of one "
                                 "(default: the task's)")
    batch_size: int | None = Field(None, ge=1, description="rows per training step per device (default: the task's)")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="peak learning rate of the linear schedule "
                                        "(default: the task's)")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay (default: the task's)")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of the steps spent warming up "
                                       "(default: the task's)")
    max_train_samples: int | None = Field(None, ge=1, description="train on a seeded sample of N rows")
    seed: int = Field(42, description="seed of the sample, the shuffling, the new head and the split")
    save_steps: int = Field(200, ge=1, description="checkpoint (and commit to the store) every N steps")
    nproc_per_node: int = Field(1, ge=1, description="training processes on this machine, in step (DDP, "
                                "launched with torchrun): one per GPU; on CPU they share the cores (gloo)")

    def resolved(self, recipe: Recipe) -> TrainConfig:
        """These hyperparameters with every unset one taken from the task's defaults."""
        defaults = {**DEFAULTS, **recipe.train_defaults}
        return self.model_copy(update={k: defaults[k] for k in DEFAULTS if getattr(self, k) is None})


def run_key(data: DatasetRef, model: ModelRef, task: str, options: Options, config: TrainConfig) -> str:
    """The training run's content key (`config` resolved: the same run whether a default was spelt out).
    Several processes train on `nproc_per_node` times the rows per step: another run; one process (the
    default, added later) leaves the keys of earlier runs as they were."""
    fields = config.resolved(get_recipe(task)).model_dump(exclude={"nproc_per_node"} if config.nproc_per_node == 1
                                                          else set())
    return digest("train", TRAIN_VERSION, data.fingerprint, model.fingerprint, task, options.model_dump(), fields)


def _logging_steps(rows: int, config: TrainConfig) -> int:
    """Log the loss about 20 times per run (at most every 50 steps), so a short run has a curve too."""
    steps = math.ceil(rows / (config.batch_size or 1) * (config.epochs or 1.0))  # resolved: both set
    return max(1, min(50, steps // 20))


def train(data: DatasetRef, model: ModelRef, store: Store, recipe: Recipe, options: Options, config: TrainConfig,
          settings: Settings) -> TrainedModel:
    """Fine-tune `model` on tokenized `data`; checkpoints go to the store and a rerun resumes from them."""
    config = config.resolved(recipe)
    key = run_key(data, model, recipe.task, options, config)
    model_key = f"runs/{key}/model"
    done = store.committed(model_key, TrainedModel)
    if done is not None:  # before any checkpoint is fetched or data loaded
        return done
    from hfbatch.tasks.training.checkpoints import last_checkpoint

    ckpt_key = f"runs/{key}/checkpoints"
    output_dir = Path(store.path(ckpt_key)) if store.is_local else store.cache_dir / "runs" / key
    resume = last_checkpoint(store, ckpt_key, output_dir)
    resumed_from = int(resume.name.split("-")[-1]) if resume else 0
    if resume:
        log.info("resuming training from %s (step %d)", resume, resumed_from)

    def produce(tmp: Path) -> TrainedModel:
        job: dict[str, Any] = dict(data=data, model=model, store=store, task=recipe.task, options=options,
                                   config=config, settings=settings, ckpt_key=ckpt_key, output_dir=output_dir,
                                   resume=resume, model_dir=tmp)
        if config.nproc_per_node > 1:
            from hfbatch.tasks.training.distributed import run_distributed

            store.local_dir(data.key)  # fetched once, before the processes read it
            fitted = run_distributed(config.nproc_per_node, fit, job)
        else:
            fitted = fit(**job)
        trained = TrainedModel(
            store=store.url, key=model_key, run_key=key, task=recipe.task, base_model=model.source,
            base_revision=model.revision, base_fingerprint=model.fingerprint, dataset_fingerprint=data.fingerprint,
            label_names=data.label_names, config=config.model_dump(), resumed_from_step=resumed_from, **fitted)
        log.info("trained %s in %d steps on %s/%s", key, trained.global_step, trained.device, trained.precision)
        write_model_card(tmp, trained, recipe.card_text(data.label_names))
        return trained

    return store.memoize(model_key, TrainedModel, produce)


def _distributed_arguments(device: str) -> dict:
    """`TrainingArguments` of a process under torchrun. Its loss is the mean over its own rows, as in one
    process: the Trainer's default (`average_tokens_across_devices`) multiplies every model's loss by the
    process count for the model to divide by the rows of all processes, which the BERT-style heads'
    own mean losses do not do (their loss, and gradients, came out doubled in 2 processes)."""
    return {"average_tokens_across_devices": False, **({"ddp_backend": "gloo"} if device == "cpu" else {})}


def fit(data: DatasetRef, model: ModelRef, store: Store, task: str, options: Options, config: TrainConfig,
        settings: Settings, ckpt_key: str, output_dir: Path, resume: Path | None, model_dir: Path) -> dict:
    """Fine-tune with the recipe's `Trainer` from `resume` (or the start), committing checkpoints to the
    store, and save the model, tokenizer and training log to `model_dir`. Under `torchrun`, every process
    runs this (DDP); the first one saves and commits. Returns the run's figures (`TrainedModel` fields)."""
    from transformers import set_seed

    from hfbatch.tasks.training.checkpoints import CheckpointCommit

    recipe = get_recipe(task)
    ds = store.load_dataset(data.key)
    if config.max_train_samples and config.max_train_samples < ds.num_rows:
        ds = ds.shuffle(seed=config.seed).select(range(config.max_train_samples))
    warnings = recipe.check_training_data(ds, data.label_names, data.source)
    for warning in warnings:
        log.warning("training data: %s", warning)
    device, precision = pick_device(settings.device)
    set_seed(config.seed)
    tokenizer = load_tokenizer(model, settings)
    net = recipe.model_for_training(model, data.label_names, settings)
    args = recipe.training_arguments(
        options, output_dir=str(output_dir), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # transformers 5: warmup_steps below 1 is a fraction of the steps
        seed=config.seed, data_seed=config.seed, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=2, logging_steps=_logging_steps(ds.num_rows, config), logging_first_step=True,
        report_to=[],
        use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", dataloader_num_workers=0,
        disable_tqdm=not os.isatty(2),
        **({"train_sampling_strategy": "group_by_length"} if recipe.group_by_length else {}),
        **(_distributed_arguments(device) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}))
    trainer = recipe.trainer(model=net, args=args, train_dataset=ds, processing_class=tokenizer,
                             data_collator=recipe.collator(tokenizer, net),
                             callbacks=[CheckpointCommit(store, ckpt_key)])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(model_dir))  # model (safetensors) + tokenizer, by the first process
    if trainer.is_world_process_zero():
        (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; keep the arguments as JSON
        (model_dir / "training_args.json").write_text(args.to_json_string())
        (model_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return dict(device=device, precision=precision, global_step=trainer.state.global_step, train_samples=ds.num_rows,
                train_samples_per_second=float(result.metrics.get("train_samples_per_second", math.nan)),
                train_loss=float(result.metrics.get("train_loss", math.nan)), warnings=tuple(warnings))
