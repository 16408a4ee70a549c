"""One continuation's capture: the reducers' outputs cut into the declared metrics' arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from corevital.core import metrics


@dataclass
class SequenceCapture:
    """One prompt's generation and its summaries; row t of every array is timeline row t.

    `values` maps each metric's column (metrics.py) to its array: (T,) per row, (T, L) per row
    and layer, (T, L, k) for a list column. Row 0 has no forward pass behind it: its float
    entries are NaN, its integer ones -1. The lens columns are absent when the lens is off.
    """

    prompt_len: int  # P
    token_ids: np.ndarray  # (T,) int64, T = P + G
    values: dict[str, np.ndarray]
    topk_ids: np.ndarray  # (T, 5) int64: the JSON trace's logits_summary.topk
    topk_probs: np.ndarray  # (T, 5)
    elapsed_ms: int
    extras: tuple = field(default=(), repr=False)  # the user metrics (metrics.UserMetric) behind extra columns

    def __getitem__(self, column: str) -> np.ndarray:
        return self.values[column]

    @property
    def num_layers(self) -> int:
        return int(self.values["hidden_mean"].shape[1])

    @cached_property
    def non_finite(self) -> tuple[np.ndarray, np.ndarray]:
        """metrics.non_finite of this capture, computed once: the health flag and the trace's
        warning both read it."""
        return metrics.non_finite(self)

    @property
    def generated_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


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
