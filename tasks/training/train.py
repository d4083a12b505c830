"""Train: fine-tune a model with the task recipe's `Trainer`, resumable from the store."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hfbatch.tasks.core.card import base_license, write_model_card
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.models import load_tokenizer, pick_device, resolve_model
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.progress import run_logger
from hfbatch.tasks.core.refs import DatasetRef, ModelRef, TrainedModel
from hfbatch.tasks.core.registry import Registry
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
    gradient_accumulation_steps: int = Field(1, ge=1, description="steps whose gradients add up before each "
                                             "optimizer step (a larger effective batch in the same memory)")
    auto_find_batch_size: bool = Field(False, description="halve the batch size until a step fits in memory")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: mixed bf16/fp16 on CUDA, fp32 "
                                                       "on CPU; bf16: bf16 autocast, also on a CPU with bf16 units "
                                                       "(AVX512-BF16, AMX): faster, results a little different; "
                                                       "fp32: no mixed precision")
    eval_strategy: Literal["no", "epoch", "steps"] = Field("no", description="evaluate the eval set's loss during "
                                                           "training; the best checkpoint is the one registered")
    eval_steps: int | None = Field(None, ge=1, description="with eval_strategy steps: every N steps (default: "
                                   "save_steps)")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N evaluations without a "
                                                "better eval loss (needs eval_strategy)")
    peft: Literal["none", "lora", "qlora"] = Field("none", description="train LoRA adapters (peft) instead of every "
                                                   "weight; qlora: on a 4-bit base (CUDA and bitsandbytes)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA inputs")
    lora_target_modules: str = Field("all-linear", description="modules that get adapters: all-linear, or names "
                                     "separated by commas (q_proj,v_proj)")
    report_to: Literal["none", "tensorboard", "mlflow", "trackio"] = Field(
        "none", description="experiment tracker of the run's parameters, losses and eval metrics: mlflow "
        "(MLFLOW_TRACKING_URI), tensorboard (event files in the model's runs/), trackio; one that is down is "
        "skipped, not fatal (not part of the run's key)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.early_stopping_patience and self.eval_strategy == "no":
            raise ValueError("early_stopping_patience needs eval_strategy epoch or steps")
        if self.eval_steps and self.eval_strategy != "steps":
            raise ValueError("eval_steps needs eval_strategy steps")
        return self

    def resolved(self, recipe: Recipe) -> TrainConfig:
        """These hyperparameters with every unset one taken from the task's defaults."""
        defaults = {**DEFAULTS, **recipe.train_defaults}
        return self.model_copy(update={k: defaults[k] for k in DEFAULTS if getattr(self, k) is None})


def run_key(data: DatasetRef, model: ModelRef, task: str, options: Options, config: TrainConfig,
            eval_data: DatasetRef | None = None) -> str:
    """The training run's content key (`config` resolved: the same run whether a default was spelt out;
    the eval set where training evaluates on it: to pick the checkpoint, or for figures of its own).
    Several processes train on `nproc_per_node` times the rows per step: another run."""
    fields = config.resolved(get_recipe(task)).model_dump(exclude={"report_to", *(
        k for k in LATER_FIELDS if getattr(config, k) == _DEFAULT[k])})
    evaluated = eval_data.fingerprint if eval_data is not None else None
    return digest("train", TRAIN_VERSION, data.fingerprint, model.fingerprint, task, options.model_dump(), fields,
                  *([evaluated] if evaluated else []))


LATER_FIELDS = ("nproc_per_node", "gradient_accumulation_steps", "auto_find_batch_size", "eval_strategy",
                "eval_steps", "early_stopping_patience", "peft", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "precision")
"""Fields added after the first runs: at their defaults they leave the keys of earlier runs as they were."""
_DEFAULT = {k: TrainConfig.model_fields[k].default for k in LATER_FIELDS}


def _logging_steps(rows: int, config: TrainConfig) -> int:
    """Log the loss about 20 times per run (at most every 50 steps), so a short run has a curve too."""
    steps = math.ceil(rows / (config.batch_size or 1) * (config.epochs or 1.0))  # resolved: both set
    return max(1, min(50, steps // 20))


def train(data: DatasetRef, model: ModelRef, store: Store, recipe: Recipe, options: Options, config: TrainConfig,
          settings: Settings, eval_data: DatasetRef | None = None) -> TrainedModel:
    """Fine-tune `model` on tokenized `data`; checkpoints go to the store and a rerun resumes from them."""
    config = config.resolved(recipe)
    key = run_key(data, model, recipe.task, options, config, eval_data)
    if config.eval_strategy != "no" and eval_data is None:
        raise ConfigError("eval_strategy needs an eval set to evaluate during training")
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
                                   resume=resume, model_dir=tmp, eval_data=eval_data)
        if config.nproc_per_node > 1:
            from hfbatch.tasks.training.distributed import run_distributed

            store.local_dir(data.key)  # fetched once, before the processes read it
            fitted = run_distributed(config.nproc_per_node, fit, job)
        else:
            fitted = fit(**job)
        base = {"base_model": model.source, "base_revision": model.revision, "base_fingerprint": model.fingerprint}
        trained = TrainedModel(
            store=store.url, key=model_key, run_key=key, task=recipe.task, dataset_fingerprint=data.fingerprint,
            label_names=data.label_names, config=config.model_dump(), resumed_from_step=resumed_from,
            prompt=recipe.prompt_record(options), dataset_source=data.source, license=base_license(model.path),
            parent=f"{model.name}@{model.version}" if model.name else None, **{**base, **fitted})
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


def watch_without_terminal(trainer, interval: float, label: str) -> None:
    """Without a terminal, the Trainer's printed log dicts give way to progress lines with a rate and time
    left every `interval` seconds (`training.progress`); in a terminal its bars stay."""
    if os.isatty(2):
        return
    from transformers.trainer_callback import PrinterCallback

    from hfbatch.tasks.training.progress import TrainingProgress

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress(interval, label))


def _adapter_card(method: str, lora) -> dict:
    """What the model card and registry say of the adapters trained (`lora`: their peft `LoraConfig`)."""
    targets = lora.target_modules
    return {"method": method, "r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
            "target_modules": ",".join(sorted(targets)) if isinstance(targets, (set, list)) else targets,
            "files": "adapter/"}


def check_peft(config: TrainConfig) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; a clear error elsewhere, before any work."""
    if config.peft != "qlora":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--peft qlora trains LoRA adapters on a 4-bit base, which needs a CUDA GPU and the "
                          "bitsandbytes package; use --peft lora here")


def with_adapters(net, recipe: Recipe, config: TrainConfig):
    """`net` with LoRA adapters (peft) on `lora_target_modules`; the task's new head (if any) trained whole."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.peft == "qlora":
        net = prepare_model_for_kbit_training(net)
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                      task_type=recipe.peft_task_type)  # its task type keeps the task's head trainable
    net = get_peft_model(net, lora)
    trainable, total = net.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d of %d parameters trained (%.2f%%)", config.lora_r, targets, trainable, total,
             100 * trainable / total)
    return net


def training_precision(wanted_device: str, wanted: str) -> tuple[str, str]:
    """(device, `bf16`|`fp16`|`fp32`) the Trainer runs in: `pick_device`'s choice for `auto`, none for `fp32`,
    bf16 autocast for `bf16` where the device has bf16 units (a `ConfigError` where it has not)."""
    device, precision = pick_device(wanted_device)
    if wanted == "fp32":
        return device, "fp32"
    if wanted == "bf16":
        from hfbatch.tasks.engine.predictor import cpu_has_bf16

        if (device == "cuda" and precision != "bf16") or (device == "cpu" and not cpu_has_bf16()):
            raise ConfigError(f"training precision 'bf16': this {device.upper()} has no bf16 units (on CPU: "
                              f"AVX512-BF16 or AMX); use 'auto'")
        return device, "bf16"
    return device, precision


def _quantized_base(config: TrainConfig) -> dict:
    if config.peft != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}


def _schedule(config: TrainConfig, has_eval: bool) -> dict:
    """When checkpoints are saved and, with an eval set, evaluated: the best by eval loss is kept at the end
    (a checkpoint at every evaluation, as `load_best_model_at_end` needs)."""
    if config.eval_strategy == "no" or not has_eval:
        return {"save_strategy": "steps", "save_steps": config.save_steps}
    steps = config.eval_steps or config.save_steps
    every = {"eval_steps": steps, "save_steps": steps} if config.eval_strategy == "steps" else {}
    return {"eval_strategy": config.eval_strategy, "save_strategy": config.eval_strategy, **every,
            "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False}


def save_trained(trainer, net, model_dir: Path, config: TrainConfig) -> None:
    """The model (and tokenizer) in `model_dir`; with adapters, the adapter in `model_dir/adapter` and the
    merged model beside it (what evaluation and bulk inference load: on a CPU a merged model runs as fast
    as its base, where base + adapter adds the adapters' matmuls to every adapted layer)."""
    if config.peft == "none":
        trainer.save_model(str(model_dir))
        return
    net.save_pretrained(str(model_dir / "adapter"))
    if trainer.is_world_process_zero():
        merged = net.merge_and_unload()
        merged.save_pretrained(str(model_dir))
        trainer.processing_class.save_pretrained(str(model_dir))


def fit(data: DatasetRef, model: ModelRef, store: Store, task: str, options: Options, config: TrainConfig,
        settings: Settings, ckpt_key: str, output_dir: Path, resume: Path | None, model_dir: Path,
        eval_data: DatasetRef | None = None) -> dict:
    """Fine-tune with the recipe's `Trainer` from `resume` (or the start), committing checkpoints to the
    store, and save the model, tokenizer and training log to `model_dir`. Under `torchrun`, every process
    runs this (DDP); the first one saves and commits. Returns the run's figures (`TrainedModel` fields)."""
    from transformers import set_seed

    from hfbatch.tasks.training import tracking
    from hfbatch.tasks.training.checkpoints import CheckpointCommit

    recipe = get_recipe(task)
    ds = store.load_dataset(data.key)
    if config.max_train_samples and config.max_train_samples < ds.num_rows:
        ds = ds.shuffle(seed=config.seed).select(range(config.max_train_samples))
    warnings = recipe.check_training_data(ds, data.label_names, data.source)
    for warning in warnings:  # said once, in the run's log (the UI's, a worker's)
        run_logger().warning("training data: %s", warning)
    device, precision = training_precision(settings.device, config.precision)
    set_seed(config.seed)
    tokenizer = load_tokenizer(model, settings)
    parent_adapter = Path(model.path) / "adapter"
    base = model
    started: dict[str, Any] = {}  # what training from a registered LoRA version changes of the record
    if config.peft != "none" and model.name and (parent_adapter / "adapter_config.json").is_file():
        # a registered LoRA version: its adapter trained on, on its own base (so the new adapter still
        # fits that base, as the parent's did), not a new adapter on the parent's merged weights
        base = resolve_model(Registry(store, model.name).entry(model.version or "champion")["base_model"], settings,
                             store)
        started = {"base_model": base.source, "base_revision": base.revision, "base_fingerprint": base.fingerprint}
    net = recipe.prepare_model(recipe.model_for_training(base, data.label_names, settings, **_quantized_base(config)),
                               tokenizer, options)
    if config.peft != "none" and started:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(parent_adapter), is_trainable=True)
        log.info("continuing the LoRA adapter of %s@%s on its base %s", model.name, model.version, base.source)
    elif config.peft != "none":
        net = with_adapters(net, recipe, config)
    evaluation = store.load_dataset(eval_data.key) if eval_data is not None else None
    callbacks: list = [CheckpointCommit(store, ckpt_key)]
    if config.early_stopping_patience and evaluation is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    args = recipe.training_arguments(
        options, output_dir=str(output_dir), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # transformers 5: warmup_steps below 1 is a fraction of the steps
        seed=config.seed, data_seed=config.seed,
        save_total_limit=2, logging_steps=_logging_steps(ds.num_rows, config), logging_first_step=True,
        report_to=[],
        use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", dataloader_num_workers=0,
        disable_tqdm=not os.isatty(2), gradient_accumulation_steps=config.gradient_accumulation_steps,
        auto_find_batch_size=config.auto_find_batch_size, **_schedule(config, evaluation is not None),
        **({"train_sampling_strategy": "group_by_length"} if recipe.groups_by_length(options) else {}),
        **(_distributed_arguments(device) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}))
    collator = recipe.packing_collator() if getattr(options, "packing", False) else recipe.collator(tokenizer, net)
    reporting, tracker = tracking.start(config.report_to, model_dir, f"hfbatch-{ckpt_key.split('/')[1][:16]}")
    trainer = recipe.trainer(options, model=net, args=args, train_dataset=ds, eval_dataset=evaluation,
                             processing_class=tokenizer, data_collator=collator, callbacks=callbacks + reporting)
    watch_without_terminal(trainer, settings.progress_interval, "training")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        tracking.finish(tracker)
    save_trained(trainer, trainer.model, model_dir, config)  # model (safetensors) + tokenizer, by the first process
    if trainer.is_world_process_zero():
        recipe.save_extras(model_dir, tokenizer, options)
        (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; keep the arguments as JSON
        (model_dir / "training_args.json").write_text(args.to_json_string())
        (model_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    if trainer.state.best_model_checkpoint:
        log.info("the best checkpoint by eval loss (%s) is the one saved", trainer.state.best_model_checkpoint)
    if config.peft != "none":
        started["adapter"] = _adapter_card(config.peft, trainer.model.peft_config["default"])
    return dict(**started, device=device, precision=precision, global_step=trainer.state.global_step,
                train_samples=ds.num_rows,
                train_samples_per_second=float(result.metrics.get("train_samples_per_second", math.nan)),
                train_loss=float(result.metrics.get("train_loss", math.nan)), warnings=tuple(warnings), tracker=tracker,
                eval_metrics=recipe.training_figures(trainer.state.log_history, options))
