"""One continuation's capture as plain arrays: what the capture layer hands on and what the
output, assess and analysis layers read (numpy only, so reading traces back never loads torch)."""

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
