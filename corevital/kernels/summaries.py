"""Summaries: pure tensor math, vectorised over any leading dims (batch, positions, layers, heads).

Everything is computed in float32; entropies are in nats. No function here syncs with the
host, so the capture hot path can call them on every forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from corevital.core import metrics
from corevital.kernels import fused

TOPK = 5
SKETCH_DIM = 8
SKETCH_SEED = 0
# how the sketch's directions are made, as a trace's run_config records it (sketch_directions)
SKETCH_RECIPE = {"method": "gaussian_unit_directions", "dim": SKETCH_DIM, "seed": SKETCH_SEED}
NEG = torch.finfo(torch.float32).min  # "minus infinity" that keeps 0 * NEG finite


def _softmax(shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores shifted so that their max is 0 (keys or tokens ruled out at NEG, not -inf) ->
    (p = softmax over the last dim, log Z with Z = sum exp(shifted)).

    The largest p is exp(0) / Z, so log Z = -log max p. torch.softmax, unlike torch.exp,
    keeps its speed when many arguments underflow (masked keys, unlikely tokens: 12x here).
    """
    p = torch.softmax(shifted, -1)
    return p, -p.amax(-1).log()


def _entropy(p: torch.Tensor, shifted: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of p = softmax(shifted), over the last dim; p is overwritten.

    -sum p log p = log Z - sum p * shifted: both terms are >= 0, so nothing cancels.
    """
    return log_z - p.mul_(shifted).sum(-1)


class LogitsSummary(NamedTuple):
    stats: torch.Tensor  # (..., 3) entropy, top-1 p, top-1 minus top-2 p
    top_p: torch.Tensor  # (..., 5)
    top_ids: torch.Tensor  # (..., 5)
    log_norm: torch.Tensor  # (...) log p(token) = logits[token] - log_norm
    picked: torch.Tensor | None  # (..., n) log p of `targets`; None without targets
    rank: torch.Tensor | None = None  # (...) 1 + how many logits exceed that of targets[..., 0]; None without targets


def logits_summary(logits: torch.Tensor, targets: torch.Tensor | None = None) -> LogitsSummary:
    """Raw logits (..., V), left unchanged -> their next-token summary.

    stats are [entropy, top-1 prob, top-1 minus top-2 prob] of softmax(logits). `targets`
    (..., n) are token ids whose log p is wanted now; a ruled-out (-inf) token gets a finite
    log p far below any real one.
    """
    s = logits.float()  # (..., V)
    flat = s.reshape(-1, s.shape[-1])  # (N, V)
    top_s, top_ids = (t.reshape(*s.shape[:-1], TOPK) for t in _top5(flat))  # (..., 5); top_s[..., 0] is the max
    shifted = torch.sub(s, top_s[..., :1]).clamp_min_(NEG)  # (..., V), max 0; -inf -> NEG
    p, log_z = _softmax(shifted)
    ent = _entropy(p, shifted, log_z)
    picked = None if targets is None else s.gather(-1, targets)  # (..., n) raw logits
    rank = None if targets is None else (s > picked[..., :1]).sum(-1) + 1  # (...)
    return _finish(ent, top_s[..., 0] + log_z, top_s, top_ids, picked)._replace(rank=rank)


def _finish(
    ent: torch.Tensor, log_norm: torch.Tensor, top_s: torch.Tensor, top_ids: torch.Tensor, picked: torch.Tensor | None
) -> LogitsSummary:
    """Entropy, log_norm = log Z + max, top 5 logits and ids, and the targets' logits (..., n)
    (or None) -> LogitsSummary."""
    top_p = (top_s - log_norm[..., None]).exp()  # (..., 5)
    stats = torch.stack([ent, top_p[..., 0], top_p[..., 0] - top_p[..., 1]], dim=-1)
    picked = None if picked is None else picked.clamp_min(NEG) - log_norm[..., None]  # (..., n)
    return LogitsSummary(stats, top_p, top_ids, log_norm, picked)


def linear_logits_summary(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | None,
    softcap: float | None = None,
    vocab_slice: int = 1024,
) -> LogitsSummary:
    """logits_summary of the logits of a linear head, hidden (n, H) @ weight (V, H)^T + bias,
    soft-capped (s -> softcap * tanh(s / softcap)) if given; targets (n, 1).

    The logits are made and summarised `vocab_slice` vocabulary ids at a time, each slice
    while it is in cache, by the fused CPU kernel's online softmax (fused.RowSoftmax): the
    (n, V) logits never exist, and the product runs in the shape MKL is fastest at
    (hidden @ slice^T: 1.2x faster here than a whole-vocabulary product). CPU, float32,
    fused.available() only.
    """
    h = hidden.float().contiguous()  # (n, H)
    n, v = h.shape[0], weight.shape[0]
    state = fused.RowSoftmax(n, targets)
    buffer = h.new_empty(n * min(vocab_slice, v))
    near = None if targets is None else _target_logits(h, weight, bias, targets[:, 0], softcap)  # (n,)
    above = torch.zeros(n, dtype=torch.int64)  # logits > near, counted slice by slice
    for v0 in range(0, v, vocab_slice):
        w = weight[v0 : v0 + vocab_slice]  # (w, H)
        s = torch.mm(h, w.T, out=buffer[: n * w.shape[0]].view(n, -1))  # (n, w)
        if bias is not None:
            s.add_(bias[v0 : v0 + vocab_slice])
        if softcap:
            s.div_(softcap).tanh_().mul_(softcap)
        state.update(s, v0)
        if near is not None:
            above += (s > near[:, None]).sum(-1)
    log_z = state.z.log()
    ent, log_norm = (log_z - state.a / state.z).float(), (state.m + log_z).float()  # (n,) each
    picked = None if targets is None else state.picked[:, None]  # (n, 1)
    # The target itself was counted if the product made its logit above the separate dot product's
    rank = None if targets is None else above - (state.picked > near).long() + 1
    return _finish(ent, log_norm, state.top_v, state.top_i, picked)._replace(rank=rank)


def _target_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """The logits (n,) of ids (n,) for hidden (n, H), by one dot product each: the threshold
    for counting the logits above them slice by slice (token_rank). It may differ from the
    slice product's value in the last bit; linear_logits_summary corrects for the target itself."""
    s = (h * weight[ids].float()).sum(-1)  # (n,)
    if bias is not None:
        s = s + bias[ids]
    return torch.tanh(s / softcap) * softcap if softcap else s


def _top5(s: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(s, 5) over the last dim of (N, V) -> (N, 5) values and ids; 3x faster than
    topk over V = 49,152 on the CPU.

    The 5 largest entries all lie in the 5 blocks of `block` with the largest maxima, or in
    the last, partial block: each of those 5 blocks holds an entry at least as large as the
    5th largest block maximum. So topk runs over 5 blocks, not the whole row.
    """
    n, v = s.shape
    nb = v // block
    if nb < 4 * TOPK:
        return s.topk(TOPK, dim=-1)
    block_max = s[:, : nb * block].reshape(n, nb, block).amax(-1)  # (N, nb)
    best = block_max.topk(TOPK, dim=-1).indices  # (N, 5) block numbers
    cols = (best[:, :, None] * block + torch.arange(block, device=s.device)).reshape(n, TOPK * block)
    if v % block:
        cols = torch.cat([cols, torch.arange(nb * block, v, device=s.device).expand(n, -1)], dim=-1)
    top, j = s.gather(-1, cols).topk(TOPK, dim=-1)  # (N, 5)
    return top, cols.gather(-1, j)


def sketch_directions(hidden_size: int) -> torch.Tensor:
    """(hidden, 8) fixed unit-length random directions.

    Drawn as torch.randn(hidden_size, 8) from a CPU generator seeded with 0 (CPU draws are
    identical on every machine), each column then divided by its L2 norm.
    """
    g = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
    d = torch.randn(hidden_size, SKETCH_DIM, generator=g, dtype=torch.float32)
    return d / d.norm(dim=0, keepdim=True)


def hidden_summary(h: torch.Tensor, directions: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Hidden states (..., H), and the states the block read (..., H) -> (..., 4 + 8 + 1):
    [mean, std (ddof 0), L2 norm, max |x|, sketch..., cosine with `before`].

    std is the norm of h - mean over sqrt(H): two passes, exact, and 2x faster on the CPU
    than torch.std_mean, as abs().amax() is 8x faster than an infinity norm. On the CPU the
    fused kernel reads each row once for all but the deviations (fused.hidden_summary).
    """
    if (
        fused.usable(h)
        and fused.usable(before)
        and h.shape == before.shape
        and directions.device.type == "cpu"
        and directions.shape == (h.shape[-1], SKETCH_DIM)
    ):
        return fused.hidden_summary([before, h], directions).view(*h.shape[:-1], 13)
    h, before = h.float(), before.float()
    mean = h.mean(-1, keepdim=True)  # (..., 1)
    std = torch.linalg.vector_norm(h - mean, dim=-1) / h.shape[-1] ** 0.5
    norm = torch.linalg.vector_norm(h, dim=-1)  # (...)
    cos = (h * before).sum(-1) / (norm * torch.linalg.vector_norm(before, dim=-1))  # (...)
    stats = torch.stack([mean[..., 0], std, norm, h.abs().amax(-1)], dim=-1)
    return torch.cat([stats, h @ directions, cos[..., None]], dim=-1)


def head_masses(p: torch.Tensor, first_key: torch.Tensor, q_offset: int, prompt_keys: int) -> torch.Tensor:
    """Attention weights (..., heads, q, k) -> (..., heads, q, 4): each head's weight on the
    sequence's first real key (the sink), on the key just before the query's own, on prompt
    keys (the first `prompt_keys` key columns), and on the query's own key.

    first_key: the first real key's column, broadcastable to (..., heads, q, 1) (-1: it is no
    longer among the keys, e.g. outside a sliding window: weight 0); query i sits at key
    column q_offset + i. A query whose previous (own) key is not among the keys gets NaN.
    """
    *lead, heads, q, k = p.shape
    col = first_key.expand(*lead, heads, q, 1)
    seen = (col >= 0) & (col < k)  # not yet among a prefill block's keys: a padding query's row, dropped later
    sink = p.gather(-1, col.clamp(0, k - 1))[..., 0] * seen[..., 0]  # (..., h, q)

    def diagonal(offset: int) -> torch.Tensor:  # (..., h, q): weight on key q_offset + i + offset, NaN if none
        d = torch.diagonal(p, offset=offset, dim1=-2, dim2=-1)  # (..., h, q - missing)
        return torch.cat([d.new_full((*lead, heads, q - d.shape[-1]), float("nan")), d], dim=-1)

    prompt = p[..., : max(0, prompt_keys)].sum(-1)  # (..., h, q)
    return torch.stack([sink, diagonal(q_offset - 1), prompt, diagonal(q_offset)], dim=-1)  # (..., h, q, 4)


def attention_masses(p: torch.Tensor, first_key: torch.Tensor, q_offset: int, prompt_keys: int) -> torch.Tensor:
    """Attention weights (..., heads, q, k) -> (..., q, 3): head_masses' sink, previous-key and
    prompt weights, each a mean over heads."""
    return head_masses(p, first_key, q_offset, prompt_keys)[..., :3].mean(-3)


# per_head: each head's values, in the order the kernels write them (metrics.PerHead declares them)
HEAD_FIELDS = tuple(m.key for m in metrics.PerHead(1).metrics)


def per_head_columns(entropy: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """Each head's entropy (..., heads, q) and head_masses (..., heads, q, 4) -> (..., q, 5 x heads),
    field-major (HEAD_FIELDS[f] of head h at f x heads + h), as the fused kernel lays them out."""
    sink, prev, prompt, own = masses.unbind(-1)
    fields = torch.stack([entropy, sink, prev, prompt, own], dim=-3)  # (..., 5, h, q)
    return fields.movedim(-1, -3).flatten(-2)  # (..., q, 5 x h)


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-rotary query (..., heads, q, d) and key (..., kv_heads, k, d) -> scaled scores (..., heads, q, k).

    Grouped-query attention: query head i reads key head i // (heads / kv_heads), as in
    transformers' repeat_kv (no copy of the keys is made). `bias` (groups * q, k), e.g. a
    causal_bias, is added by the product itself (baddbmm), at no extra pass; not with softcap.
    `out`, a flat float32 buffer of at least as many elements as the scores, receives them
    (without bias): a block reused for every layer costs no fresh pages (CPU page faults).
    """
    *lead, heads, q, d = query.shape
    kv, k = key.shape[-3], key.shape[-2]
    keys_t = key.float().reshape(-1, k, d).transpose(1, 2)  # (lead * kv, d, k)
    if bias is None:  # 3-d bmm: 1.4x faster than a 4-d matmul on the CPU
        q_scaled = (query.float() * scaling).reshape(-1, heads // kv * q, d)  # (lead * kv, groups * q, d)
        into = None if out is None else out[: q_scaled.shape[0] * q_scaled.shape[1] * k].view(q_scaled.shape[0], -1, k)
        scores = torch.bmm(q_scaled, keys_t, out=into)  # (lead * kv, groups * q, k)
    else:
        scores = torch.baddbmm(bias, query.float().reshape(-1, heads // kv * q, d), keys_t, alpha=scaling)
    scores = scores.reshape(*lead, heads, q, k)  # (..., h, q, k)
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def fused_kernels(device: torch.device) -> bool:
    """Whether the fused CPU kernels serve `device`: then linear_logits_summary works, and
    attention_stats applies a plain causal mask (mask=None) at no pass of its own, so callers
    need no causal_bias."""
    return device.type == "cpu" and fused.available()


def causal_bias(groups: int, q: int, k: int, q_offset: int, device=None) -> torch.Tensor:
    """(groups * q, k) additive mask for attention_scores: 0 where query i, at key position
    q_offset + i, may attend key j (j <= q_offset + i), NEG above; repeated for each query head
    of a key head."""
    bias = torch.zeros(q, k, device=device)
    bias[:, q_offset:].masked_fill_(_future_keys(q, k, q_offset, device), NEG)
    return bias.repeat(groups, 1)


def _future_keys(q: int, k: int, q_offset: int, device) -> torch.Tensor:
    """(q, k - q_offset) boolean: True where query i, at key position q_offset + i, would look
    ahead at key q_offset + j (keys before q_offset are visible to every query)."""
    return torch.ones(q, k - q_offset, dtype=torch.bool, device=device).triu_(1)


def attention_stats(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    q_offset: int,
    masked: bool = False,
    masses: tuple[torch.Tensor, int] | None = None,
    per_head: bool = False,
) -> torch.Tensor:
    """Scaled scores (..., heads, q, k), overwritten -> (..., q, 3): [mean and min over heads of
    the attention entropy over keys, largest single weight over heads and keys].

    mask: None (plain causal; query i sits at key position q_offset + i), boolean (True =
    may attend) or additive float, broadcastable to the scores. Keys a query may not see get
    weight 0. A query that sees no key (a padding position, never a timeline row) gets
    finite garbage. masked=True: the scores already hold NEG where keys are hidden (a
    causal_bias), and mask is not applied again. On the CPU the fused kernel (fused.py) does
    the softmax, the statistics, the masses and their means over heads in one pass per row,
    and skips the hidden keys of a plain causal mask, or of a boolean one, itself.
    masses (first_key, prompt_keys): add attention_masses' three columns, read from the same
    weights (..., q, 6); with `per_head` (masses needed) also each head's values
    (per_head_columns): (..., q, 6 + 5 x heads).
    """
    if fused.usable(scores):  # softmax, statistics, masses and their means over heads in one pass per row
        usable_mask = not masked and fused.fits(mask, scores)
        if mask is not None and not masked and not usable_mask:
            _mask_scores(scores, mask, q_offset)
        first, prompt_keys = masses if masses is not None else (None, 0)
        stats = fused.attention_summary(
            scores, mask is None and not masked, q_offset, mask if usable_mask else None, first, prompt_keys, per_head
        )  # (..., q, 6 or 6 + 5h); scores now hold p
        return stats if masses is not None else stats[..., :3]
    if not masked:
        _mask_scores(scores, mask, q_offset)
    scores.sub_(scores.amax(-1, keepdim=True))  # (..., h, q, k), max 0 per row
    p, log_z = _softmax(scores)  # (..., h, q, k), (..., h, q); hidden keys get exactly 0
    heads = None if masses is None else head_masses(p, masses[0], q_offset, masses[1])  # (..., h, q, 4)
    ent, max_p = _entropy(p, scores, log_z), (-log_z).exp()  # (..., h, q) each
    stats = torch.stack([ent.mean(-2), ent.amin(-2), max_p.amax(-2)], dim=-1)  # (..., q, 3)
    if heads is None:
        return stats
    stats = torch.cat([stats, heads[..., :3].mean(-3)], dim=-1)  # (..., q, 6)
    return torch.cat([stats, per_head_columns(ent, heads)], dim=-1) if per_head else stats


def _mask_scores(scores: torch.Tensor, mask: torch.Tensor | None, q_offset: int) -> None:
    """Set the scores (..., q, k) of keys a query may not see to NEG, in place (see attention_stats)."""
    if mask is None:  # causal: only the last q keys hold keys that some query may not see
        scores[..., q_offset:].masked_fill_(
            _future_keys(scores.shape[-2], scores.shape[-1], q_offset, scores.device), NEG
        )
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask, NEG)
    else:
        scores.add_(mask.float()).clamp_min_(NEG)


def sink_attention_summary(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    q_offset: int,
    sinks: torch.Tensor,
    masses: tuple[torch.Tensor, int],
    per_head: bool = False,
) -> torch.Tensor:
    """attention_stats for attention with per-head sink logits (gpt-oss's s_aux): scaled scores
    (..., heads, q, k), overwritten, and sinks (heads,) -> (..., q, 6) (attention_stats with
    masses; (..., q, 6 + 5 x heads) with `per_head`).

    The sink is one more column in each head's softmax that no key owns, so a query's weights
    over its keys sum to less than 1; entropy and largest weight are those of the weights over
    keys (-sum over keys of a log a), as the model's own attention weights are.
    """
    _mask_scores(scores, mask, q_offset)
    *lead, heads, q, k = scores.shape
    sink = sinks.float().reshape(heads, 1, 1).expand(*lead, heads, q, 1)
    p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :k]  # (..., h, q, k)
    ent = -torch.xlogy(p, p).sum(-1)  # (..., h, q)
    each = head_masses(p, masses[0], q_offset, masses[1])  # (..., h, q, 4)
    stats = torch.stack([ent.mean(-2), ent.amin(-2), p.amax(-1).amax(-2)], dim=-1)  # (..., q, 3)
    stats = torch.cat([stats, each[..., :3].mean(-3)], dim=-1)  # (..., q, 6)
    return torch.cat([stats, per_head_columns(ent, each)], dim=-1) if per_head else stats


def attention_summary(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    q_offset: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """attention_stats of attention_scores: (..., heads, q, d), (..., kv_heads, k, d) -> (..., q, 3)."""
    return attention_stats(attention_scores(query, key, scaling, softcap), mask, q_offset)
