"""Summaries: pure tensor math, vectorised over any leading dims (batch, positions, layers, heads).

Everything is computed in float32; entropies are in nats. No function here syncs with the
host, so the capture hot path can call them on every forward pass.
"""

from __future__ import annotations

import torch

TOPK = 5
SKETCH_DIM = 8
SKETCH_SEED = 0
LOGIT_STATS = ("logits_entropy", "logits_top1_prob", "logits_top1_top2_margin")
HIDDEN_STATS = ("hidden_mean", "hidden_std", "hidden_l2_norm", "hidden_max_abs")
ATTN_STATS = ("attn_entropy_mean", "attn_entropy_min", "attn_concentration_max")


def entropy(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim; zero-probability entries contribute 0 (not NaN)."""
    return 0.0 - torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # 0.0 - x: no "-0.0"


def logits_summary(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logits (..., V) -> stats (..., 3), top-k probs (..., 5), top-k ids (..., 5), log-probs (..., V).

    stats are [entropy, top-1 prob, top-1 minus top-2 prob] of softmax(logits).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    p = logp.exp()
    top_p, top_ids = p.topk(TOPK, dim=-1)  # (..., 5)
    stats = torch.stack([entropy(p, logp), top_p[..., 0], top_p[..., 0] - top_p[..., 1]], dim=-1)
    return stats, top_p, top_ids, logp


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
    stats = torch.stack([h.mean(-1), h.std(-1, correction=0), torch.linalg.vector_norm(h, dim=-1), h.abs().amax(-1)], dim=-1)
    return torch.cat([stats, h @ directions], dim=-1)


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    q_offset: int, softcap: float | None = None) -> torch.Tensor:
    """Attention weights (batch, heads, q, k) from post-rotary query (b, h, q, d) and key (b, h, k, d).

    mask: None (plain causal; query i sits at key position q_offset + i), boolean (True = may
    attend) or additive float, broadcastable to (b, h, q, k). Keys a query may not see get 0.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (b, h, q, k)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        q_pos = torch.arange(query.shape[-2], device=query.device)[:, None] + q_offset  # (q, 1)
        mask = torch.arange(key.shape[-2], device=query.device)[None, :] <= q_pos  # (q, k)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key (padding queries) -> 0


def attention_summary(probs: torch.Tensor) -> torch.Tensor:
    """Attention weights (batch, heads, q, k) -> (batch, q, 3): [mean and min over heads of the
    entropy over keys, largest single weight over heads and keys]."""
    ent = entropy(probs, torch.log(probs))  # (b, h, q)
    conc = probs.amax(-1)  # (b, h, q)
    return torch.stack([ent.mean(1), ent.amin(1), conc.amax(1)], dim=-1)
