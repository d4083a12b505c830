"""What a training recipe is: everything hfbatch knows about training and evaluating one ML task.

A recipe declares its options (data columns and task settings: `options_class`, a `core.options.Options`
model), how a source table becomes its canonical Arrow columns (`prepare`), how those are tokenized and
collated, which model and `Trainer` classes train it, how predictions become metrics, and what its model
card says. Ingest, tokenize, train and evaluate look recipes up by task name (`tasks.recipes.get_recipe`).
Running a trained model in bulk is its predictor's work (`tasks/predictors/`), not the recipe's.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.models import load_model
from hfbatch.tasks.core.options import NoOptions, Options
from hfbatch.tasks.core.progress import run_logger
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.predictor import has_head
from hfbatch.tasks.metrics.paired import RowStats

log = logging.getLogger(__name__)
OptionsT = TypeVar("OptionsT", bound=Options)


class Recipe(Generic[OptionsT]):
    """Base class of the recipes; each trainable ML task is one subclass in a module of this package,
    `Recipe[ItsOptions]`."""

    task: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    options_class: ClassVar[type[Options]] = NoOptions
    model_class: ClassVar[str] = ""
    """The `transformers` auto class that loads the model, e.g. `AutoModelForSequenceClassification`."""
    heads: ClassVar[tuple[str, ...]] = ()
    """Endings of the architectures that have this task's head (a base checkpoint gets a new one)."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """The metrics evaluation computes, the first one the champion gate's default."""
    max_length: ClassVar[int] = 128
    """Default token limit of an input when training and evaluating."""
    train_defaults: ClassVar[dict[str, Any]] = {}
    """This task's default hyperparameters (`epochs`, `batch_size`, `learning_rate`, `weight_decay`,
    `warmup_ratio`), where they differ from `tasks.training.train.DEFAULTS`."""
    peft_task_type: ClassVar[str] = ""
    """peft's `TaskType` of this task's model (`SEQ_CLS`, `CAUSAL_LM`, ...): which head LoRA leaves trainable."""
    stratify_by: ClassVar[str | None] = None
    """Column a held-out split is stratified by."""
    group_by_length: ClassVar[bool] = False
    """Train on batches of rows of similar length (less padding where lengths vary a lot). Training
    only: under that setting the Trainer orders predict()'s batches by length too, and the predictions
    would come back out of the data's order."""

    def groups_by_length(self, options: OptionsT) -> bool:
        """Whether training with these options batches rows of similar length (`group_by_length`)."""
        return self.group_by_length

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    def check_metrics(self, metrics: tuple[str, ...]) -> None:
        unknown = [m for m in metrics if m not in self.metrics]
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown} for {self.task}; available: {list(self.metrics)}")

    # --- ingest -----------------------------------------------------------------------------------
    def prepare(self, dataset, src: str, options: OptionsT, label_names: tuple[str, ...] | None):
        """Validate a loaded source (`datasets.Dataset`) and map it to the recipe's canonical columns.
        Returns `(dataset, label_names)`; raises `DataError` naming the source, column and row."""
        raise NotImplementedError

    def check_training_data(self, dataset, label_names: tuple[str, ...], src: str) -> list[str]:
        """Refuse training data the task cannot learn from (a `DataError` naming it); return warnings
        for what it can learn from badly (they go to the log and the model card)."""
        return []

    # --- tokenize, collate, train -------------------------------------------------------------------
    def tokenize(self, dataset, tokenizer, options: OptionsT, max_length: int, split: str):
        """Model inputs (and labels) of a prepared dataset; `split` is `train` or `eval`."""
        raise NotImplementedError

    def collator(self, tokenizer, model):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def packing_collator(self):
        """The collator of padding-free batches (`--packing`), for a task that has one."""
        raise ConfigError(f"{self.task} has no padding-free batches (--packing)")

    def prepare_model(self, net, tokenizer, options: OptionsT):
        """The model to fine-tune, adjusted for the task before training (its generation defaults)."""
        return net

    def save_extras(self, model_dir, tokenizer, options: OptionsT) -> None:
        """Files of the task's own saved beside the trained model (how it is to be prompted)."""

    def prompt_record(self, options: OptionsT) -> dict | None:
        """How the trained model is to be prompted (a language model's prompt template and system prompt),
        for its registry entry and card; None where the task has no prompts."""
        return None

    def model_kwargs(self, label_names: tuple[str, ...]) -> dict[str, Any]:
        """`from_pretrained` arguments of the model to fine-tune (a head of the right size)."""
        return {}

    def model_for_training(self, model: ModelRef, label_names: tuple[str, ...], settings: Settings, **kwargs):
        """The model to fine-tune, from a base checkpoint (a new head, said in the log) or one with this
        task's head (`kwargs`: more `from_pretrained` arguments, a quantized base's)."""
        if self.heads and has_head(model, self.heads, (self.task, *self.aliases)) is False:
            run_logger().warning("%s has no %s head: a new one, randomly initialised, is trained with it (the "
                                 "load report's 'newly initialized' weights)", model.source, self.task)
        return load_model(model, self.model_class, settings, **self.model_kwargs(label_names), **kwargs)

    def trained_model(self, model: ModelRef, settings: Settings):
        """A fine-tuned model of this task, to evaluate."""
        return load_model(model, self.model_class, settings)

    def trainer(self, options: OptionsT | None = None, **kwargs):
        """The `Trainer` (or subclass) this task fine-tunes with, given the run's `options`, or evaluates
        with (no options)."""
        from transformers import Trainer

        return Trainer(**kwargs)

    def evaluates_while_training(self, options: OptionsT) -> bool:
        """Whether training measures figures of its own on the eval set (`training_figures`) even where
        no `eval_strategy` asks for evaluation during training."""
        return False

    def training_figures(self, log_history: list[dict], options: OptionsT) -> dict[str, float]:
        """Figures of the trained model that training measured (on the eval set), registered beside the
        evaluation's metrics."""
        return {}

    def training_arguments(self, options: OptionsT, **kwargs):
        """The `TrainingArguments` (or subclass) for `kwargs`, plus this task's own from `options`."""
        from transformers import TrainingArguments

        return TrainingArguments(**kwargs)

    # --- evaluate -----------------------------------------------------------------------------------
    def generates(self) -> bool:
        """Whether evaluation generates the rows' answers (`generated`) rather than predicting the features."""
        return False

    def generated(self, model: ModelRef, examples, settings: Settings, options: OptionsT) -> list:
        """The eval rows' generated answers (for a task that `generates`)."""
        raise NotImplementedError

    def postprocess(self, predictions: Any, features, examples, tokenizer, model_config,
                    label_names: tuple[str, ...], options: OptionsT) -> tuple[list, list]:
        """`(predictions, references)` in the form the task's metrics take them, from a model's raw
        `predictions` (`Trainer.predict`) on the tokenized `features` of the prepared `examples` (label
        ids, tag sequences, answer texts, decoded strings). A `--metric-module` gets these too."""
        raise NotImplementedError

    def compute_metrics(self, predictions: list, references: list, label_names: tuple[str, ...],
                        metrics: tuple[str, ...]) -> tuple[dict, dict]:
        """`(metrics, details)`: the headline figures named `metrics`, and the task's detail tables
        (`per_class`, `confusion_matrix`, `per_type`, `samples`, `examples`: `tasks/artifacts.py` shows them)."""
        raise NotImplementedError

    def row_statistics(self, predictions: list, references: list, label_names: tuple[str, ...],
                       metrics: tuple[str, ...]) -> dict[str, RowStats]:
        """Each eval row's statistics of the `metrics` this task can resample (`metrics.paired`), from the
        same post-processed predictions and references as `compute_metrics`: the champion gate's evidence
        and each metric's interval. A metric left out is compared on its point estimate."""
        return {}

    def output_table(self, predictions: Any, predicted: list, model_config) -> pa.Table | None:
        """The eval set's predictions in the columns bulk inference writes (`label`, `entities`, `answer`,
        `generated_text`, ...), from the raw `predictions` and their post-processed form: what
        `core.monitoring.figures` records as the version's reference for drift. None: no reference."""
        return None

    def gate_problem(self, metrics: dict, details: dict) -> str | None:
        """Why an evaluated model must not become champion whatever it scores (a degenerate model), or None."""
        return None

    def card_text(self, label_names: tuple[str, ...]) -> dict:
        """The model card's words: `summary`, `intended_use` and `limitations`."""
        return {}


def require_columns(table: pa.Table, src: str, options: OptionsT) -> None:
    """A `DataError` naming the source, the missing column and its option, or for an empty source."""
    if table.num_rows == 0:
        raise DataError(f"data source {src!r} is empty (0 rows)")
    for field, column in options.columns().items():
        if column not in table.column_names:
            raise DataError(f"data source {src!r} has no column {column!r} (--{field.replace('_', '-')}); "
                            f"its columns are {table.column_names}")


def first_bad_row(mask, src: str, column: str, what: str) -> None:
    """A `DataError` naming the first row where `mask` is true."""
    if pc.any(mask).as_py():
        row = int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src!r} row {row}: column {column!r} {what}")
