"""What a task recipe is: everything hfbatch knows about one ML task, in one class.

A recipe declares its options (data columns and task settings, pydantic models whose fields become
flow parameters and command-line options), how a source table becomes its canonical Arrow columns,
how those are tokenized and collated, which model and `Trainer` classes train it, how predictions
become metrics, what its model card says, and the predictor that runs it over Parquet in bulk.
Training, evaluation, the registry, inference and the CLI look recipes up by task name
(`tasks.recipes.get_recipe`); a task that only predicts leaves the training part unset.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError
from ..inference.predictor import Predictor


class Options(BaseModel):
    """Base of every recipe's options: immutable and hashable (they are part of cache keys), and
    ignorant of fields that belong to other recipes (flows pass all of them)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def columns(self) -> dict[str, str]:
        """The data columns these options name (fields called `*_column`): what ingest depends on."""
        return {k: v for k, v in self.model_dump().items() if k.endswith("_column")}


class NoOptions(Options):
    pass


class Recipe:
    """Base class of the recipes; each ML task is one subclass in a module of this package."""

    task: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    # bulk inference
    predictor: ClassVar[type[Predictor]]
    infer_options: ClassVar[type[Options]] = NoOptions

    # training and evaluation (unset: the task predicts, but hfbatch does not train it)
    train_options: ClassVar[type[Options] | None] = None
    model_class: ClassVar[str] = ""
    """The `transformers` auto class that loads the model, e.g. `AutoModelForSequenceClassification`."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """The metrics evaluation computes, the first one the champion gate's default."""
    max_length: ClassVar[int] = 128
    """Default token limit of an input when training and evaluating."""
    stratify_by: ClassVar[str | None] = None
    """Column a held-out split is stratified by."""

    @property
    def trainable(self) -> bool:
        return self.train_options is not None

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    def check_trainable(self) -> None:
        if not self.trainable:
            raise ConfigError(f"hfbatch predicts with {self.task} models but does not train them")

    # --- ingest -----------------------------------------------------------------------------------
    def prepare(self, dataset, src: str, options: Options, label_names: tuple[str, ...] | None):
        """Validate a loaded source (`datasets.Dataset`) and map it to the recipe's canonical columns.
        Returns `(dataset, label_names)`; raises `DataError` naming the source, column and row."""
        raise NotImplementedError

    # --- tokenize, collate, train -------------------------------------------------------------------
    def tokenize(self, dataset, tokenizer, options: Options, max_length: int, split: str):
        """Model inputs (and labels) of a prepared dataset; `split` is `train` or `eval`."""
        raise NotImplementedError

    def collator(self, tokenizer, model):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def model_kwargs(self, label_names: tuple[str, ...]) -> dict[str, Any]:
        """`from_pretrained` arguments of the model to fine-tune (a head of the right size)."""
        return {}

    def trainer(self, **kwargs):
        """The `Trainer` (or subclass) this task trains and evaluates with."""
        from transformers import Trainer

        return Trainer(**kwargs)

    def training_arguments(self, **kwargs):
        """The `TrainingArguments` (or subclass) for `kwargs`, plus this task's own."""
        from transformers import TrainingArguments

        return TrainingArguments(**kwargs)

    # --- evaluate -----------------------------------------------------------------------------------
    def check_metrics(self, metrics: tuple[str, ...]) -> None:
        unknown = [m for m in metrics if m not in self.metrics]
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown} for {self.task}; available: {list(self.metrics)}")

    def score(self, predictions: np.ndarray, features, examples, label_names: tuple[str, ...], model_config,
              metrics: tuple[str, ...], options: Options) -> tuple[dict, dict]:
        """`(metrics, details)` of a model's raw `predictions` (`Trainer.predict`) on the tokenized
        `features` of the prepared `examples`: the headline figures, and the task's detail tables."""
        raise NotImplementedError

    def detail_artifacts(self, details: dict, label_names: tuple[str, ...]) -> dict[str, tuple[str, Any]]:
        """Prefect artifacts of the details: `{key suffix: ("table" | "markdown", content)}`."""
        return {}

    def card_text(self, label_names: tuple[str, ...]) -> dict:
        """The model card's words: `summary`, `intended_use` and `limitations`."""
        return {}
