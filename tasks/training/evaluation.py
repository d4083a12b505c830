"""Evaluate: a model on a tokenized eval set → the task recipe's metrics, through the `evaluate` library."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from hfbatch.tasks.core.fingerprint import digest
from hfbatch.tasks.core.models import load_tokenizer, pick_device
from hfbatch.tasks.core.monitoring import figures
from hfbatch.tasks.core.options import Options
from hfbatch.tasks.core.refs import DatasetRef, EvalResult, ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.metrics import compute_custom, module_fingerprint, paired
from hfbatch.tasks.recipes import Recipe
from hfbatch.tasks.training.train import watch_without_terminal

EVAL_VERSION = 4
log = logging.getLogger(__name__)


def eval_key(model: ModelRef, features: DatasetRef, task: str, options: Options, metrics: tuple[str, ...],
             metric_module: str | None = None) -> str:
    custom = module_fingerprint(metric_module) if metric_module else None
    return "evals/" + digest("eval", EVAL_VERSION, model.fingerprint, features.fingerprint, task,
                             options.model_dump(), list(metrics), custom)


def evaluate_model(model: ModelRef, examples: DatasetRef, features: DatasetRef, store: Store, recipe: Recipe,
                   options: Options, settings: Settings, metrics: tuple[str, ...] | None = None,
                   metric_module: str | None = None, batch_size: int = 64) -> EvalResult:
    """Predict the tokenized `features` of the eval set `examples` with `model`, post-process the
    predictions as the recipe says and compute `metrics` (default: all of the recipe's) and those of
    a user's `metric_module`; the details go to the store as JSON files."""
    from transformers import AutoConfig

    metrics = tuple(metrics or recipe.metrics)
    recipe.check_metrics(metrics)
    key = eval_key(model, features, recipe.task, options, metrics, metric_module)

    def produce(tmp: Path) -> EvalResult:
        net = recipe.trained_model(model, settings)
        tokenizer = load_tokenizer(model, settings)
        ds = store.load_dataset(features.key)
        device, precision = pick_device(settings.device)
        with tempfile.TemporaryDirectory() as scratch:
            args = recipe.training_arguments(
                options, output_dir=scratch, per_device_eval_batch_size=batch_size, report_to=[],
                use_cpu=device == "cpu",
                bf16_full_eval=precision == "bf16", fp16_full_eval=precision == "fp16",
                disable_tqdm=not os.isatty(2))
            trainer = recipe.trainer(model=net, args=args, processing_class=tokenizer,
                                     data_collator=recipe.collator(tokenizer, net))
            watch_without_terminal(trainer, settings.progress_interval, "evaluation")
            if recipe.generates():  # answers generated as bulk inference generates them; the loss on the targets
                loss = trainer.evaluate(ds)["eval_loss"] if "loss" in metrics else None
                predictions = recipe.generated(model, store.load_dataset(examples.key), settings, options)
            else:
                predictions = trainer.predict(ds).predictions
        config = AutoConfig.from_pretrained(model.path)
        predicted, references = recipe.postprocess(predictions, ds, store.load_dataset(examples.key), tokenizer,
                                                   config, examples.label_names, options)
        scores, details = recipe.compute_metrics(predicted, references, examples.label_names, metrics)
        rows = checked_rows(recipe.row_statistics(predicted, references, examples.label_names, metrics), scores)
        (tmp / paired.ROWS_FILE).write_text(json.dumps(rows))
        if recipe.generates() and loss is not None:
            scores["loss"] = float(loss)
        if metric_module:
            scores |= compute_custom(metric_module, predicted, references)
        outputs = recipe.output_table(predictions, predicted, config)
        if outputs is not None:  # what bulk inference of this model is compared with (drift)
            details["reference_figures"] = figures(outputs)
        (tmp / "metrics.json").write_text(json.dumps(scores, indent=2))
        for name, value in details.items():
            (tmp / f"{name}.json").write_text(json.dumps(value, indent=2))
        return EvalResult(store=store.url, key=key, model=model.source, model_fingerprint=model.fingerprint,
                          dataset_fingerprint=examples.fingerprint, num_rows=examples.num_rows,
                          label_names=examples.label_names, metrics=scores, details=details,
                          intervals={m: paired.interval(m, r) for m, r in rows.items()})

    return store.memoize(key, EvalResult, produce)


def checked_rows(rows: dict[str, paired.RowStats], scores: dict) -> dict[str, paired.RowStats]:
    """The row statistics whose figure on all rows is the metric computed: one that is not (a recipe's bug)
    is left out, with a warning, so that the gate never resamples a different figure than it shows."""
    kept = {}
    for metric, row in rows.items():
        value = paired.figure(metric, row)
        if math.isclose(value, scores[metric], rel_tol=1e-6, abs_tol=1e-9):
            kept[metric] = row
        else:
            log.warning("%s: its row statistics give %s, not %s: no interval, the gate compares point estimates",
                        metric, value, scores[metric])
    return kept
