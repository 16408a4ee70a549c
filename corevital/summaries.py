"""Summaries: pure tensor math, vectorised over any leading dims (batch, positions, layers, heads).

Everything is computed in float32; entropies are in nats. No function here syncs with the
host, so the capture hot path can call them on every forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TOPK = 5
SKETCH_DIM = 8
SKETCH_SEED = 0
NEG = torch.finfo(torch.float32).min  # "minus infinity" that keeps 0 * NEG finite


def _softmax_stats(shifted: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For scores already shifted so that their max is 0: log Z and the entropy of softmax,
    in nats, over the last dim. With inplace=True, `shifted` is overwritten (by e log e).

    With e = exp(s) and Z = sum e: p = e / Z, and -sum p log p = log Z - sum(e * s) / Z.
    The largest probability is exp(0) / Z = 1 / Z. In place, e * s is computed as e log e,
    which needs no second buffer (xlogy(0, 0) = 0 for keys or tokens ruled out).
    """
    if inplace:
        e = shifted.exp_()
        z = e.sum(-1)
        es = e.xlogy_(e).sum(-1)
    else:
        e = shifted.exp()
        z = e.sum(-1)
        es = e.mul_(shifted).sum(-1)
    log_z = z.log()
    return log_z, log_z - es / z


class LogitsSummary(NamedTuple):
    stats: torch.Tensor  # (..., 3) entropy, top-1 p, top-1 minus top-2 p
    top_p: torch.Tensor  # (..., 5)
    top_ids: torch.Tensor  # (..., 5)
    log_z: torch.Tensor  # (...)
    shifted: torch.Tensor | None  # (..., V) logits minus their max; None when computed in place
    picked: torch.Tensor | None  # (..., n) log p of `targets`; None without targets


def logits_summary(logits: torch.Tensor, inplace: bool = False, targets: torch.Tensor | None = None) -> LogitsSummary:
    """Raw logits (..., V) -> their next-token summary; log p(token) = shifted[token] - log Z.

    stats are [entropy, top-1 prob, top-1 minus top-2 prob] of softmax(logits). `targets`
    (..., n) are token ids whose log p is wanted now. With inplace=True, float32 `logits`
    are consumed as scratch (a large block needs no second one) and `shifted` is None.
    """
    s = logits.float()
    s = s.clamp_min_(NEG) if inplace or s is not logits else s.clamp_min(NEG)  # -inf -> finite; NaN stays NaN
    s.sub_(s.amax(-1, keepdim=True))  # (..., V), max 0
    top_s, top_ids = s.topk(TOPK, dim=-1)  # (..., 5)
    picked = None if targets is None else s.gather(-1, targets)  # (..., n), shifted
    log_z, ent = _softmax_stats(s, inplace=inplace)
    top_p = (top_s - log_z[..., None]).exp()
    stats = torch.stack([ent, top_p[..., 0], top_p[..., 0] - top_p[..., 1]], dim=-1)
    picked = None if picked is None else picked - log_z[..., None]
    return LogitsSummary(stats, top_p, top_ids, log_z, None if inplace else s, picked)


def sketch_directions(hidden_size: int) -> torch.Tensor:
    """(hidden, 8) fixed unit-length random directions.

    Drawn as torch.randn(hidden_size, 8) from a CPU generator seeded with 0 (CPU draws are
    identical on every machine), each column then divided by its L2 norm.
    """
    g = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
    d = torch.randn(hidden_size, SKETCH_DIM, generator=g, dtype=torch.float32)
    return d / d.norm(dim=0, keepdim=True)


def hidden_summary(h: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Hidden states (..., H) -> (..., 4 + 8): [mean, std (ddof 0), L2 norm, max |x|, sketch...]."""
    h = h.float()
    std, mean = torch.std_mean(h, dim=-1, correction=0)
    norms = [torch.linalg.vector_norm(h, ord=o, dim=-1) for o in (2, float("inf"))]  # L2, max |x|
    return torch.cat([torch.stack([mean, std, *norms], dim=-1), h @ directions], dim=-1)


def attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Post-rotary query (..., heads, q, d) and key (..., kv_heads, k, d) -> scaled scores (..., heads, q, k).

    Grouped-query attention: query head i reads key head i // (heads / kv_heads), as in
    transformers' repeat_kv (no copy of the keys is made).
    """
    *lead, heads, q, d = query.shape
    kv, k = key.shape[-3], key.shape[-2]
    grouped = (query.float() * scaling).reshape(*lead, kv, heads // kv * q, d)  # (..., kv, groups * q, d)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).reshape(*lead, heads, q, k)  # (..., h, q, k)
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attention_stats(scores: torch.Tensor, mask: torch.Tensor | None, q_offset: int) -> torch.Tensor:
    """Scaled scores (..., heads, q, k), overwritten -> (..., q, 3): [mean and min over heads of
    the attention entropy over keys, largest single weight over heads and keys].

    mask: None (plain causal; query i sits at key position q_offset + i), boolean (True =
    may attend) or additive float, broadcastable to the scores. Keys a query may not see get
    weight 0. A query that sees no key (a padding position, never a timeline row) gets
    finite garbage.
    """
    q = scores.shape[-2]
    if mask is None:  # causal: keys up to q_offset are visible to every row; hide key j > q_offset + i
        tail = scores[..., q_offset:]  # (..., h, q, k - q_offset)
        tail.masked_fill_(torch.ones(q, tail.shape[-1], dtype=torch.bool, device=scores.device).triu_(1), NEG)
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask, NEG)
    else:
        scores.add_(mask.float()).clamp_min_(NEG)
    scores.sub_(scores.amax(-1, keepdim=True))  # (..., h, q, k), max 0 per row
    log_z, ent = _softmax_stats(scores)  # (..., h, q)
    return torch.stack([ent.mean(-2), ent.amin(-2), (-log_z).exp().amax(-2)], dim=-1)  # (..., q, 3)


def attention_summary(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                      q_offset: int, softcap: float | None = None) -> torch.Tensor:
    """attention_stats of attention_scores: (..., heads, q, d), (..., kv_heads, k, d) -> (..., q, 3)."""
    return attention_stats(attention_scores(query, key, scaling, softcap), mask, q_offset)
