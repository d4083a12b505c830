"""Batches cut by a token budget, padded only to their longest row."""
from __future__ import annotations

import numpy as np


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, pad_slack: float = 0.1, min_slack: int = 8
                         ) -> list[np.ndarray]:
    """Row indices sorted by length, cut so that rows x longest row <= `batch_tokens` per batch (a row
    longer than the budget gets a batch of its own) and so that no row is padded by more than
    `max(min_slack, pad_slack x shortest row)` tokens: padding is compute thrown away, and a budget
    alone would let one batch span lengths 5 to 100 (half its tokens padding on mixed data)."""
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        if (i == len(order) or (i + 1 - start) * ordered[i] > batch_tokens
                or ordered[i] > ordered[start] + max(min_slack, pad_slack * ordered[start])):
            batches.append(order[start:i])
            start = i
    return batches


def pad_batch(rows: np.ndarray, ids: list, types: list | None, lengths: np.ndarray, pad_id: int,
              left: bool = False) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask` (and `token_type_ids` when `types` is given) of `rows`, padded to
    the longest of them, on the right or, for `left`, on the left."""
    width = int(lengths[rows].max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    token_types = np.zeros((len(rows), width), dtype=np.int64) if types is not None else None
    for j, r in enumerate(rows):
        n = lengths[r]
        span = slice(width - n, width) if left else slice(0, n)
        input_ids[j, span], mask[j, span] = ids[r], 1
        if token_types is not None and types is not None:
            token_types[j, span] = types[r]
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if token_types is not None:
        batch["token_type_ids"] = token_types
    return batch
