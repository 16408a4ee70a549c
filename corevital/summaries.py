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
TINY = torch.finfo(torch.float32).tiny
FLOOR = -80.0  # shifted scores are raised to this before exp; see _weights


def _weights(shifted: torch.Tensor) -> torch.Tensor:
    """Scores shifted so that their max is 0 (clamped in place) -> unnormalised softmax
    weights e = exp(s).

    Scores below FLOOR are raised to it first: a weight of exp(-80) = 1.8e-35 instead of less
    is invisible in float32 sums of about 1, while exp of an argument that underflows (below
    -88) runs several times slower on x86 CPUs. It also turns -inf (a ruled-out token) into a
    finite score, so that 0 * -inf never makes a NaN. Masked keys are set to exactly 0 after.
    """
    return shifted.clamp_min_(FLOOR).exp()


def _entropy(e: torch.Tensor, shifted: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights e = exp(shifted) and their sum z -> log z and the entropy of e / z, in nats, over
    the last dim; e is overwritten. With p = e / z: -sum p log p = log z - sum(e * s) / z."""
    log_z = z.log()
    return log_z, log_z - e.mul_(shifted).sum(-1) / z


class LogitsSummary(NamedTuple):
    stats: torch.Tensor  # (..., 3) entropy, top-1 p, top-1 minus top-2 p
    top_p: torch.Tensor  # (..., 5)
    top_ids: torch.Tensor  # (..., 5)
    log_norm: torch.Tensor  # (...) log p(token) = logits[token] - log_norm
    picked: torch.Tensor | None  # (..., n) log p of `targets`; None without targets


def logits_summary(logits: torch.Tensor, targets: torch.Tensor | None = None, rows_per_pass: int | None = None) -> LogitsSummary:
    """Raw logits (..., V), left unchanged -> their next-token summary.

    stats are [entropy, top-1 prob, top-1 minus top-2 prob] of softmax(logits). `targets`
    (..., n) are token ids whose log p is wanted now; a ruled-out (-inf) token gets a finite
    log p far below any real one. The softmax passes run over `rows_per_pass` rows at a
    time (default: all), so that their scratch stays in cache and small next to the logits.
    """
    s = logits.float()  # (..., V)
    top_s, top_ids = s.topk(TOPK, dim=-1)  # (..., 5); top_s[..., 0] is the max
    flat, mx = s.reshape(-1, s.shape[-1]), top_s.reshape(-1, TOPK)[:, :1]  # (N, V), (N, 1)
    n = flat.shape[0]
    step = n if rows_per_pass is None else max(1, rows_per_pass)
    scratch = flat.new_empty(min(step, n), flat.shape[1])  # (rows, V)
    log_z, ent = flat.new_empty(n), flat.new_empty(n)  # (N,)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        shifted = torch.sub(flat[r0:r1], mx[r0:r1], out=scratch[:r1 - r0])  # (rows, V), max 0
        e = _weights(shifted)
        log_z[r0:r1], ent[r0:r1] = _entropy(e, shifted, e.sum(-1))
    log_norm = (mx[:, 0] + log_z).reshape(s.shape[:-1])  # (...)
    top_p = (top_s - log_norm[..., None]).exp()
    stats = torch.stack([ent.reshape(s.shape[:-1]), top_p[..., 0], top_p[..., 0] - top_p[..., 1]], dim=-1)
    picked = None if targets is None else s.gather(-1, targets).clamp_min_(NEG) - log_norm[..., None]  # (..., n)
    return LogitsSummary(stats, top_p, top_ids, log_norm, picked)


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
    grouped = (query.float() * scaling).reshape(-1, heads // kv * q, d)  # (lead * kv, groups * q, d)
    keys_t = key.float().reshape(-1, k, d).transpose(1, 2)  # (lead * kv, d, k)
    scores = torch.bmm(grouped, keys_t).reshape(*lead, heads, q, k)  # (..., h, q, k); 3-d bmm: 1.4x faster than 4-d matmul on CPU
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attention_stats(scores: torch.Tensor, mask: torch.Tensor | None, q_offset: int,
                    value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled scores (..., heads, q, k), overwritten -> (..., q, 3): [mean and min over heads of
    the attention entropy over keys, largest single weight over heads and keys]; and, given
    `value` (..., kv_heads, k, dv), the attention output (..., heads, q, dv) from the same
    weights (else None).

    mask: None (plain causal; query i sits at key position q_offset + i), boolean (True =
    may attend) or additive float, broadcastable to the scores. Keys a query may not see get
    weight 0. A query that sees no key (a padding position, never a timeline row) gets
    finite garbage.
    """
    if mask is not None and mask.dtype != torch.bool:
        scores.add_(mask.float())
    start, hide = _hidden_keys(mask, q_offset, scores.shape[-2:], scores.device)  # keys start.. of (..., q, k)
    scores[..., start:].masked_fill_(hide, NEG)
    scores.sub_(scores.amax(-1, keepdim=True))  # (..., h, q, k), max 0 per row
    e = _weights(scores)  # (..., h, q, k)
    e[..., start:].masked_fill_(hide, 0.0)
    z = e.sum(-1).clamp_min_(TINY)  # (..., h, q); >= 1 unless the query sees no key
    out = None if value is None else _weighted_values(e, value).div_(z[..., None])  # (..., h, q, dv)
    log_z, ent = _entropy(e, scores, z)  # (..., h, q)
    return torch.stack([ent.mean(-2), ent.amin(-2), (-log_z).exp().amax(-2)], dim=-1), out  # (..., q, 3)


def _hidden_keys(mask: torch.Tensor | None, q_offset: int, qk: torch.Size, device) -> tuple[int, torch.Tensor]:
    """The keys each query may not see: (start, hide) with hide a boolean mask broadcastable to
    keys start.. of (..., q, k). Plain causal masks only the last q keys' upper triangle."""
    q, k = qk
    if mask is None:  # causal: query i sees keys 0 .. q_offset + i
        return q_offset, torch.ones(q, k - q_offset, dtype=torch.bool, device=device).triu_(1)
    if mask.dtype == torch.bool:
        return 0, ~mask
    return 0, mask <= torch.finfo(mask.dtype).min / 2  # additive: its "minus infinity" entries


def _weighted_values(e: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Weights (..., heads, q, k) x value (..., kv_heads, k, dv) -> (..., heads, q, dv), grouped
    as in attention_scores."""
    *lead, heads, q, k = e.shape
    kv, dv = value.shape[-3], value.shape[-1]
    out = torch.bmm(e.reshape(-1, heads // kv * q, k), value.float().reshape(-1, k, dv))  # (lead * kv, groups * q, dv)
    return out.reshape(*lead, heads, q, dv)


def attention_summary(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                      q_offset: int, softcap: float | None = None) -> torch.Tensor:
    """attention_stats of attention_scores: (..., heads, q, d), (..., kv_heads, k, d) -> (..., q, 3)."""
    return attention_stats(attention_scores(query, key, scaling, softcap), mask, q_offset)[0]
