"""Answer spans of extractive question answering, for training and evaluation, as transformers'
`run_qa.py` and `utils_qa.postprocess_qa_predictions` compute them (SQuAD v1: every question has an
answer): the token positions of an answer inside a window of its context, and the best answer text of
an example from its windows' start and end logits."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

N_BEST = 20
"""Start and end tokens tried per window: the `n_best_size` best of each."""
MAX_ANSWER_LENGTH = 30
"""Longest answer, in tokens."""
NO_ANSWER = "empty"
"""utils_qa's answer when no window has a valid span (rare: every window's best tokens outside the context)."""


def answer_positions(offsets: list, sequence_ids: list, context_index: int, start_char: int, end_char: int,
                     cls_index: int) -> tuple[int, int]:
    """The first and last token of the characters `[start_char, end_char)` in one window (`offsets`:
    the tokens' character spans, `sequence_ids`: which sequence each token belongs to), or `cls_index`
    twice when the answer is not wholly inside the window's part of the context."""
    inside = [i for i, s in enumerate(sequence_ids) if s == context_index]
    first, last = inside[0], inside[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    starts = np.array([offsets[i][0] for i in range(first, last + 1)])
    ends = np.array([offsets[i][1] for i in range(first, last + 1)])
    # offsets grow along the context: the last token starting at or before the answer, and the first
    # one ending at or after it
    start = first + int(np.searchsorted(starts, start_char, side="right")) - 1
    end = first + int(np.searchsorted(ends, end_char, side="left"))
    return start, end


def window_offsets(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An `offset_mapping` column (a list of `[start, end]` per token, null outside the context) as flat
    arrays: `(bounds, starts, ends)`, window `w`'s tokens being `bounds[w]:bounds[w + 1]` of `starts`
    and `ends`, which are -1 where the offset is null."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    bounds = column.offsets.to_numpy() - column.offsets[0].as_py()
    tokens = column.flatten()
    starts = pc.list_element(tokens, 0).fill_null(-1).to_numpy(zero_copy_only=False)
    ends = pc.list_element(tokens, 1).fill_null(-1).to_numpy(zero_copy_only=False)
    return bounds, starts, ends


def best_answers(start_logits: np.ndarray, end_logits: np.ndarray, window_examples: list, bounds: np.ndarray,
                 starts: np.ndarray, ends: np.ndarray, ids: list, contexts: list[str], n_best: int = N_BEST,
                 max_answer_length: int = MAX_ANSWER_LENGTH) -> list[str]:
    """The answer text of each example (`ids`, `contexts`), from the logits of its windows.

    Window `w` belongs to the example `window_examples[w]`; its logits are row `w` of `start_logits`
    and `end_logits` (padded rows: only the window's own tokens are read). In each window the
    `n_best` highest start and end logits are paired; a pair counts when both tokens lie in the context,
    the end is not before the start and the span is at most `max_answer_length` tokens; its score is
    the sum of the two logits. The example's answer is the context text of its best-scoring pair over
    all its windows; of equal scores, the first found (window, then start rank, then end rank)."""
    index = {example_id: i for i, example_id in enumerate(ids)}
    best: list[tuple[float, int, int] | None] = [None] * len(ids)
    for w, example_id in enumerate(window_examples):
        i = index[example_id]
        lo, hi = int(bounds[w]), int(bounds[w + 1])
        start, end = np.asarray(start_logits[w][: hi - lo]), np.asarray(end_logits[w][: hi - lo])
        # the n_best highest, best first, as utils_qa takes them
        top_starts = np.argsort(start)[-1: -n_best - 1: -1]
        top_ends = np.argsort(end)[-1: -n_best - 1: -1]
        s, e = np.meshgrid(top_starts, top_ends, indexing="ij")
        ok = ((starts[lo + s] >= 0) & (starts[lo + e] >= 0) & (e >= s) & (e - s + 1 <= max_answer_length))
        if not ok.any():
            continue
        scores = np.where(ok, start[s] + end[e], -np.inf).ravel()
        k = int(np.argmax(scores))  # the first maximum in (start rank, end rank) order
        found = best[i]
        if found is None or scores[k] > found[0]:  # a later window wins only with a higher score
            best[i] = (float(scores[k]), int(starts[lo + s.ravel()[k]]), int(ends[lo + e.ravel()[k]]))
    return [contexts[i][b[1]:b[2]] if b is not None else NO_ANSWER for i, b in enumerate(best)]
