"""The reducers' outputs cut into one continuation's arrays by the metric declarations
(SequenceCapture, core/sequence.py)."""

from __future__ import annotations

import numpy as np

from corevital.core import metrics


def cut(
    outputs: dict[str, np.ndarray], i: int, rows: slice, extras=()
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Sequence i's rows of the recorder's outputs (b, C, ...) -> (metric values, topk ids, topk
    probs), each with row 0 prepended (NaN, or -1 for integers)."""
    cache: dict[str, np.ndarray] = {}

    def take(name: str, integer: bool = False) -> np.ndarray:
        if name not in cache:
            dtype = np.int64 if integer else np.float32
            body = outputs[name][i, rows].astype(dtype)
            if not integer:  # a summary of an overflowed (Inf) tensor is NaN like the rest of it
                body[np.isinf(body)] = np.nan
            first = np.full((1, *body.shape[1:]), -1 if integer else np.nan, dtype=dtype)
            cache[name] = np.concatenate([first, body])
        return cache[name]

    values = {}
    for m in metrics.all_metrics(extras):
        if m.reducer not in outputs:  # the logit lens, off
            continue
        v = take(m.reducer, integer=m.type == metrics.I32)
        v = v if m.slot is None else v[..., m.slot]
        if m.first_rows > 1:
            v = v.copy()
            v[: m.first_rows] = np.nan  # e.g. row 1's query is the first token: no key before it
        values[m.column] = v
    return values, take("topk_ids", integer=True), take("topk_probs")
