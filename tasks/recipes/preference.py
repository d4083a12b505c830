"""Preference training of a causal language model: `--objective dpo` through TRL's `DPOTrainer`, `orpo`
through its `ORPOTrainer` (in `trl.experimental`: the completions' loss plus an odds-ratio preference
term, no reference model).

The text-generation recipe tokenizes the preference rows itself (`prompt_ids`, `chosen_ids`,
`rejected_ids`: the prompt through the chat template, each answer ending with EOS, over-long rows cut
from the prompt's start as for supervised fine-tuning), in the flow's cached tokenize step; the trainer
takes them as they are instead of tokenizing the rows again (DPO's `_prepare_dataset`, ORPO's
`tokenize_row`, which only lays them out as its collator wants them). DPO's reference model is
the model training starts from: with LoRA, the same weights with the new adapter at its initial value
(TRL copies it as a frozen `ref` adapter, deleted after training so only the trained one is saved).
At the end of training, the eval set's reward margins and accuracies (what TRL logs) are measured once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

PREFERENCE_FIGURES = {"eval_rewards/margins": "reward_margin", "eval_rewards/accuracies": "reward_accuracy",
                      "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected",
                      "eval_loss": "preference_loss", "eval_log_odds_ratio": "log_odds_ratio",
                      "eval_nll_loss": "chosen_nll_loss"}
"""TRL's end-of-training figures on the eval set, by the names the registry keeps them under (the last
two ORPO's only)."""


def preference_trainer(objective: str, beta: float, **kwargs: Any):
    """A `DPOTrainer` or `ORPOTrainer` for `kwargs` (a `Trainer`'s: its `TrainingArguments` become the
    trainer's config with `beta`; the collator is TRL's, which pads chosen and rejected answers into one
    batch)."""
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    args = kwargs.pop("args")
    kwargs.pop("data_collator", None)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # activation (gradient) checkpointing as TRL does by default: a preference batch holds twice the sequences
    # (8 SQuAD pairs of up to 512 tokens took more than 24 GB without it). transformers 5 reads the new name only:
    # the copied `activation_checkpointing=False` would make the deprecated `gradient_checkpointing` alias a no-op
    fields |= {"activation_checkpointing": True, "gradient_checkpointing": True}
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class OddsRatioTrainer(_Finish, ORPOTrainer):
            def tokenize_row(self, feature, model=None):
                if "prompt_ids" in feature:  # tokenized by the recipe's cached step
                    return _orpo_row(feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"])
                return super().tokenize_row(feature, model)

        # its max_length only bounds its own tokenization, which the recipe's rows (already cut) skip
        return OddsRatioTrainer(args=ORPOConfig(**fields, beta=beta, max_length=1 << 30), **kwargs)

    class PreferenceTrainer(_Finish, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:  # tokenized by the recipe's cached step
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    # rows already cut to --max-length
    return PreferenceTrainer(args=DPOConfig(**fields, beta=beta, max_length=None), **kwargs)


class _Finish:
    """After training: the eval set's figures measured once, and DPO's frozen reference adapter removed."""

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.eval_dataset is not None:
            self.evaluate()  # figures to the log history (`preference_figures`)
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")
        return result


def _orpo_row(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    """A tokenized preference row as `ORPOTrainer`'s collator takes it: prompt, and each answer after the
    prompt with labels on the answer only."""
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        row |= {f"{name}_input_ids": prompt + answer, f"{name}_attention_mask": [1] * (len(prompt) + len(answer)),
                f"{name}_labels": [-100] * len(prompt) + answer}
    return row


def preference_figures(log_history: list[dict]) -> dict[str, float]:
    """The last evaluation's reward figures in a trainer's log history, under the registry's names."""
    last: dict = next((e for e in reversed(log_history) if "eval_rewards/margins" in e), {})
    return {name: float(last[key]) for key, name in PREFERENCE_FIGURES.items() if key in last}
