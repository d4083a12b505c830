"""References that steps pass to each other: small, immutable descriptions of what the store holds.

A step returns a reference, never a payload; its completion marker in the store holds the same
reference (`to_meta`), so a cache hit rebuilds it (`from_meta`) without reading the data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic

R = TypeVar("R", bound="Ref")


class Ref:
    """Mixin of the frozen dataclasses below: the JSON form kept in a completion marker."""

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # a dataclass: every subclass is one

    @classmethod
    def from_meta(cls: type[R], meta: dict[str, Any]) -> R:
        return pydantic.TypeAdapter(cls).validate_python(meta)


@dataclass(frozen=True)
class DatasetRef(Ref):
    """A committed `datasets` Arrow dataset at `key` in the store."""

    store: str
    key: str
    fingerprint: str
    num_rows: int
    label_names: tuple[str, ...]
    """Class or tag names (classification, token classification); empty for other tasks."""
    source: str
    task: str = "text-classification"

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.key}"


@dataclass(frozen=True)
class ModelRef(Ref):
    """A resolved model: where its files are on this machine and what identifies them."""

    source: str
    path: str
    fingerprint: str
    tokenizer_fingerprint: str
    revision: str | None = None
    name: str | None = None
    version: str | None = None
    task: str | None = None
    """The task a registered version was trained for."""

    @property
    def label(self) -> str:
        """Registry name, hub revision's repo, or the source as given: how outputs name the model."""
        return self.name or self.source


@dataclass(frozen=True)
class TrainedModel(Ref):
    """A fine-tuned model in the store (`runs/<run_key>/model`)."""

    store: str
    key: str
    run_key: str
    task: str
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
    warnings: tuple[str, ...] = ()
    """What the training data's check found worth saying (extreme imbalance, ...)."""
    adapter: dict | None = None
    """The LoRA adapters trained (method, r, alpha, dropout, target modules), None for a full fine-tune."""
    prompt: dict | None = None
    """How a language model was prompted in training (`prompt_template`, `system_prompt`), else None."""
    dataset_source: str = ""
    """The training data as the user named it (a path, URL or Hub dataset id)."""
    license: str | None = None
    """The base model's license, as its model card says (None: not known)."""
    parent: str | None = None
    """`NAME@VERSION` of the registered version training started from (a warm start), None otherwise."""
    tracker: dict | None = None
    """The experiment tracker that recorded the training (`training.tracking`: name, run id or event files,
    and an error where it was down), None without one."""
    eval_metrics: dict = field(default_factory=dict)
    """Figures training measured on the eval set (preference training's reward margin and accuracy),
    registered beside the evaluation's metrics (`Recipe.training_figures`)."""

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.key}"


@dataclass(frozen=True)
class EvalResult(Ref):
    """A model's metrics on an eval set (`evals/<key>`): the headline `metrics` and the task's `details`
    (per class and confusion matrix for classification, per entity type for NER, ...)."""

    store: str
    key: str
    model: str
    model_fingerprint: str
    dataset_fingerprint: str
    num_rows: int
    label_names: tuple[str, ...]
    metrics: dict
    details: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    """`{metric: [low, high]}`: 95 % bootstrap intervals over the eval rows (`metrics.paired`)."""

    @property
    def uri(self) -> str:
        return f"{self.store}/{self.key}"
