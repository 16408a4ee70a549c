"""Fused CPU kernels for the softmax statistics (fused.c), compiled at first use.

torch has no single op for "entropy, max and top 5 of a softmax", so on the CPU the
statistics of attention rows and of prefill logits cost 6-7 passes over memory in torch
ops, more than the products that make the scores. fused.c does each in two passes over
data in cache. It is compiled once per machine (native.py) and loaded with ctypes.
Its OpenMP loops run on torch's own OpenMP threads (fused.c says why), so torch's thread
count applies.

Where no compiler works, or COREVITAL_FUSED=0, `available()` is False and summaries.py
uses its torch ops, which tests check against the same reference.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from corevital import native


@cache
def _library() -> ctypes.CDLL | None:
    lib = native.library("fused.c")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.attention_rows.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr]
        lib.logits_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    return lib


def available() -> bool:
    return _library() is not None


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels can take `t`: a contiguous float32 CPU tensor, and a compiled library."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and available()


def attention_rows(scores: torch.Tensor, causal_block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (..., k), contiguous float32 on the CPU, overwritten by their softmax weights
    -> (entropy, largest weight), each (...).

    causal_block (c, q_offset): rows are, in each leading index, groups x c query rows whose
    first query sits at key position q_offset, and row i of c sees keys 0..q_offset + i.
    None: every key is visible, except those whose score is already very negative (masked).
    """
    k = scores.shape[-1]
    rows = scores.numel() // k
    entropy, max_p = scores.new_empty(scores.shape[:-1]), scores.new_empty(scores.shape[:-1])
    c, q_offset = causal_block or (1, 0)
    _library().attention_rows(scores.data_ptr(), rows, k, causal_block is not None, c, q_offset, entropy.data_ptr(),
                              max_p.data_ptr())
    return entropy, max_p


class RowSoftmax:
    """Running softmax statistics of n rows of logits that arrive one vocabulary slice at a
    time (logits_rows in fused.c), so that the (n, V) logits never exist at once: per row the
    max m, Z = sum exp(s - m) and A = sum exp(s - m) (s - m) (float64), the top 5 (values
    descending, vocabulary ids) and the logit of its target id."""

    def __init__(self, n: int, targets: torch.Tensor | None = None):
        self.m = torch.full((n,), torch.finfo(torch.float32).min)
        self.z, self.a = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.top_v, self.top_i = torch.full((n, 5), float("-inf")), torch.full((n, 5), -1, dtype=torch.int64)
        self.targets = None if targets is None else targets.reshape(n).to(torch.int64).contiguous()
        self.picked = torch.full((n,), float("nan"))

    def update(self, logits: torch.Tensor, v0: int) -> None:
        """logits (n, w), contiguous float32 on the CPU: vocabulary ids v0 .. v0 + w - 1."""
        n, w = logits.shape
        targets = None if self.targets is None else self.targets.data_ptr()
        _library().logits_rows(logits.data_ptr(), n, w, v0, self.m.data_ptr(), self.z.data_ptr(), self.a.data_ptr(),
                               self.top_v.data_ptr(), self.top_i.data_ptr(), targets, self.picked.data_ptr())
