"""Preference training of a causal language model (`--objective dpo`), through TRL's `DPOTrainer`.

The text-generation recipe tokenizes the preference rows itself (`prompt_ids`, `chosen_ids`,
`rejected_ids`: the prompt through the chat template, each answer ending with EOS, over-long rows cut
from the prompt's start as for supervised fine-tuning), in the flow's cached tokenize step; the trainer
takes them as they are instead of tokenizing the rows again (`_prepare_dataset`). The reference model is
the model training starts from: with LoRA, the same weights with the new adapter at its initial value
(TRL copies it as a frozen `ref` adapter, deleted after training so only the trained one is saved).
At the end of training, the eval set's reward margins and accuracies (what TRL logs) are measured once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

PREFERENCE_FIGURES = {"eval_rewards/margins": "reward_margin", "eval_rewards/accuracies": "reward_accuracy",
                      "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected",
                      "eval_loss": "preference_loss"}
"""TRL's end-of-training figures on the eval set, by the names the registry keeps them under."""


def preference_trainer(beta: float, **kwargs: Any):
    """A `DPOTrainer` for `kwargs` (a `Trainer`'s: its `TrainingArguments` become a `DPOConfig` with
    `beta`; the collator is TRL's, which pads chosen and rejected answers into one batch)."""
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    args = kwargs.pop("args")
    kwargs.pop("data_collator", None)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # rows already cut to --max-length; gradient checkpointing as TRL does by default: a preference batch holds
    # twice the sequences (8 SQuAD pairs of up to 512 tokens took more than 24 GB without it)
    config = DPOConfig(**fields | {"gradient_checkpointing": True}, beta=beta, max_length=None)

    class PreferenceTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:  # tokenized by the recipe's cached step
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            if self.eval_dataset is not None:
                self.evaluate()  # its figures go to the log history (`TextGeneration.training_figures`)
            if "ref" in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter("ref")
            return result

    return PreferenceTrainer(args=config, **kwargs)


def preference_figures(log_history: list[dict]) -> dict[str, float]:
    """The last evaluation's reward figures in a trainer's log history, under the registry's names."""
    last: dict = next((e for e in reversed(log_history) if "eval_rewards/margins" in e), {})
    return {name: float(last[key]) for key, name in PREFERENCE_FIGURES.items() if key in last}
