"""A causal language model's training loss computed only where there is something to learn.

Supervised fine-tuning learns the completion, not the prompt: most positions of a batch have no target
(label -100), yet a causal LM's forward pass runs its head (hidden size x vocabulary, 49k words for
SmolLM2) and the loss over every position. `TargetsOnlyTrainer` asks the model for the logits of the
positions that have a target in some row of the batch (`logits_to_keep`, as generation does for the last
position), and computes the same loss as the model's own (`ForCausalLMLoss`: labels shifted by one, the
sum over targets divided by the batch's target count, the Trainer's `num_items_in_batch`).
"""
from __future__ import annotations

from typing import Any


def targets_only_trainer(**kwargs):
    """A `Trainer` whose loss runs the language-model head only at positions that have a target."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class TargetsOnlyTrainer(Trainer):
        def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None):
            if "labels" not in inputs or self.label_smoother is not None or self.compute_loss_func is not None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            targets = inputs.pop("shift_labels", None)  # what position t predicts (padding-free collators)
            if targets is None:
                targets = F.pad(labels[..., 1:], (0, 1), value=-100)
            keep = targets.ne(-100).any(0).nonzero().squeeze(-1)
            outputs = model(**inputs, logits_to_keep=keep)
            wanted = targets[:, keep]
            loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), wanted.flatten(), ignore_index=-100,
                                   reduction="sum")
            count = num_items_in_batch if num_items_in_batch is not None else wanted.ne(-100).sum()
            loss = loss / torch.clamp(torch.as_tensor(count, device=loss.device), min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            return (loss, outputs) if return_outputs else loss

    return TargetsOnlyTrainer(**kwargs)
