"""Fused CPU kernels for capture's statistics (fused.c), compiled at first use.

torch has no single op for "entropy, max and top 5 of a softmax", so on the CPU the
statistics of attention rows and of prefill logits cost 6-7 passes over memory in torch
ops, more than the products that make the scores; and on small layers the dozens of
small ops per layer cost more than their arithmetic. fused.c does each row in two or
three passes over data in cache, and a decode step's attention (attention_decode) or a
layer's hidden-state summary (hidden_summary) in one call. It is compiled once per machine
(native.py) and loaded with ctypes.
Its OpenMP loops run on torch's own OpenMP threads (fused.c says why), so torch's thread
count applies.

Where no compiler works, or COREVITAL_FUSED=0, `available()` is False and summaries.py
uses its torch ops, which tests check against the same reference.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from corevital.kernels import native


@cache
def _library() -> ctypes.CDLL | None:
    lib = native.library(Path(__file__).with_name("fused.c"))
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.attention_summary.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, ptr]
        lib.attention_decode.argtypes = [i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, ptr, ptr]
        lib.max_threads.restype = i64
        lib.hidden_summary.argtypes = [i64, ptr, i64, i64, ptr, ptr]
        lib.logits_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    return lib


def available() -> bool:
    return _library() is not None


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels can take `t`: a contiguous float32 CPU tensor, and a compiled library."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and available()


def attention_summary(
    scores: torch.Tensor,
    causal: bool,
    q_offset: int,
    mask: torch.Tensor | None,
    first_key: torch.Tensor | None,
    prompt_keys: int,
    per_head: bool = False,
) -> torch.Tensor:
    """Scaled scores (..., heads, q, k), contiguous float32 on the CPU, overwritten by their
    softmax weights -> (..., q, 6): summaries.attention_stats' statistics and masses; with
    `per_head` (..., q, 6 + 5 x heads), each head's values after them (summaries.HEAD_FIELDS).

    Query i sits at key column q_offset + i; causal: it sees no key after that. mask: None, or
    one that `fits` the scores. first_key: the sink's column per batch row (int64, (batch,) or
    broadcastable; -1: none); None: no sink. The prompt's keys are columns 0..prompt_keys-1.
    """
    *lead, heads, q, k = scores.shape
    batch = scores.shape[-4] if scores.dim() >= 4 else 1
    out = scores.new_empty(*lead, q, width(heads, per_head))
    first = _per_row(first_key, batch)
    m, m_lead, m_row = _mask_args(mask)
    _library().attention_summary(
        scores.data_ptr(),
        scores.numel() // (heads * q * k),
        heads,
        q,
        k,
        causal,
        q_offset,
        m,
        m_lead,
        m_row,
        batch,
        first.data_ptr(),
        prompt_keys,
        per_head,
        out.data_ptr(),
    )
    return out


def width(heads: int, per_head: bool) -> int:
    """The statistics per query: 6, or 6 + 5 x heads with each head's values."""
    return 6 + 5 * heads if per_head else 6


def fits(mask: torch.Tensor | None, scores: torch.Tensor) -> bool:
    """Whether the kernels read `mask` as it is: None, or a boolean CPU mask (batch or 1, 1,
    q or 1, >= k) for scores (..., batch, heads, q, k), its rows contiguous."""
    return mask is None or scores.dim() >= 4 and _fits(mask, scores.shape[-4], scores.shape[-2], scores.shape[-1])


def _fits(mask: torch.Tensor, batch: int, q: int, k: int) -> bool:
    return (
        mask.dtype == torch.bool
        and mask.device.type == "cpu"
        and mask.dim() == 4
        and mask.shape[0] in (1, batch)
        and mask.shape[1] == 1
        and mask.shape[2] in (1, q)
        and mask.shape[3] >= k
        and mask.stride(-1) == 1
    )


def _mask_args(mask: torch.Tensor | None) -> tuple[int | None, int, int]:
    """A mask (batch or 1, 1, q or 1, k) that `fits` as the kernels take it: its address, and
    the strides (elements) of its batch rows and query rows, 0 where it broadcasts."""
    if mask is None:
        return None, 0, 0
    return mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2) if mask.shape[2] > 1 else 0


def _per_row(first_key: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The sink's column for each batch row, (batch,) int64 (-1: no sink)."""
    if first_key is None:
        return torch.full((batch,), -1, dtype=torch.int64)
    first = first_key.reshape(-1).to(torch.int64)
    return (first.expand(batch) if first.numel() == 1 else first).contiguous()


def decode_mask(mask: torch.Tensor | None, batch: int, k: int) -> bool:
    """Whether attention_decode reads `mask` as it is: None, or a boolean CPU mask (batch or 1,
    1, 1, k) with contiguous rows."""
    return mask is None or _fits(mask, batch, 1, k) and mask.shape[3] == k


def attention_decode(
    queries, keys, scales, mask: torch.Tensor | None, first_key: torch.Tensor, prompt_keys: int, per_head: bool = False
) -> torch.Tensor:
    """One decode step's attention statistics for every layer, read in place: per layer the
    unscaled query (b, heads, 1, d) and keys (b, kv_heads, k, d), contiguous float32 CPU tensors
    of one shape, and its scaling; a `decode_mask` -> (b, 1, layers, 6), as attention_summary's
    for the query at key column k - 1 (b, 1, layers, 6 + 5 x heads with `per_head`)."""
    lib = _library()
    b, heads, _, d = queries[0].shape
    kv, k = keys[0].shape[1], keys[0].shape[2]
    layers = len(queries)
    out = torch.empty(b, 1, layers, width(heads, per_head))
    work = torch.empty(heads * out_work(k))
    addresses = torch.tensor([[q.data_ptr() for q in queries], [x.data_ptr() for x in keys]], dtype=torch.int64)
    scale = torch.tensor(scales, dtype=torch.float32)
    first = _per_row(first_key, b)
    m, m_lead, _ = _mask_args(mask)
    lib.attention_decode(
        layers,
        addresses[0].data_ptr(),
        addresses[1].data_ptr(),
        scale.data_ptr(),
        b,
        heads,
        kv,
        k,
        d,
        m,
        m_lead,
        first.data_ptr(),
        prompt_keys,
        per_head,
        work.data_ptr(),
        out.data_ptr(),
    )
    return out


def out_work(k: int) -> int:
    """Scratch for k keys, in floats: a row of k rounded up to whole vectors (16 floats) per
    thread (attention_decode takes one per head and thread)."""
    return _library().max_threads() * -(-k // 16) * 16


def hidden_summary(states, directions: torch.Tensor) -> torch.Tensor:
    """Consecutive blocks' hidden states, read in place: states[0] the first block's input,
    states[l + 1] block l's output, each (..., hidden) of one shape, contiguous float32 on the
    CPU; directions (hidden, 8) -> (rows, layers, 13) with rows = the states' leading elements:
    summaries.hidden_summary's values for each block."""
    hidden = states[0].shape[-1]
    rows, layers = states[0].numel() // hidden, len(states) - 1
    out = torch.empty(rows, layers, 13)
    dirs = directions.float().contiguous()
    addresses = torch.tensor([x.data_ptr() for x in states], dtype=torch.int64)
    _library().hidden_summary(layers, addresses.data_ptr(), rows, hidden, dirs.data_ptr(), out.data_ptr())
    return out


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
        _library().logits_rows(
            logits.data_ptr(),
            n,
            w,
            v0,
            self.m.data_ptr(),
            self.z.data_ptr(),
            self.a.data_ptr(),
            self.top_v.data_ptr(),
            self.top_i.data_ptr(),
            targets,
            self.picked.data_ptr(),
        )
