"""The load-time cross-check: capture's values on a short padded batch, against a computation
that shares none of capture's code.

Capture is exact or refused, and that is decided here, for the model as loaded (its
architecture, dtype, placement and the installed transformers), before anything is generated:

1. capture generates greedily for a batch of two left-padded probe prompts (PROBE_LENGTHS
   tokens, PROBE_NEW_TOKENS new ones), exactly as a job does;
2. each continuation is run again, alone and unpadded, through the model's own forward pass
   with its eager attention returning the weights, forward hooks reading every block's
   input and output, all in the model's dtype;
3. every value a job records (the columns of COLUMNS, for every row and layer) is recomputed
   from those tensors in float64 by the plain formulas of docs/format.md, and compared at the
   dtype's tolerance (TOLERANCE).

A model whose values differ, or whose forward pass fails, is refused with one sentence that
names the column, the layer and the row (support.check). The probe is cheap for any model
size: a few dozen tokens.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from corevital.capture import capture_ids, decoder_layers, execution_device
from corevital.core.config import SamplingConfig
from corevital.kernels.summaries import SKETCH_DIM, SKETCH_SEED

PROBE_LENGTHS = (11, 6)  # two prompts of different lengths: the shorter one is left-padded
PROBE_NEW_TOKENS = 4
# |captured - recomputed| <= tol * (1 + |recomputed|) (the sketch: 1 + the hidden vector's norm): float32
# rounding, or a low-precision model's own rounding of every tensor (eager attention rounds the scores
# before its softmax, SDPA does not)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2**-4, torch.float16: 2**-6}
# token_rank may differ by the logits within this much (x max(1, |logit|)) of the token's own: capture's
# SDPA pass and the eager recomputation round the logits differently, so a near-tie may swap
RANK_BAND = {torch.float32: 1e-5, torch.float64: 1e-12}
COLUMNS = (
    "logits_entropy",
    "logits_top1_prob",
    "logits_top1_top2_margin",
    "token_logprob",
    "token_rank",
    "hidden_mean",
    "hidden_std",
    "hidden_l2_norm",
    "hidden_max_abs",
    "hidden_cos_prev",
    "hidden_sketch",
    "attn_entropy_mean",
    "attn_entropy_min",
    "attn_concentration_max",
    "attn_sink_mass",
    "attn_prev_mass",
    "attn_prompt_mass",
)


def probe_prompts(model) -> list[list[int]]:
    """PROBE_LENGTHS token ids drawn from the ordinary vocabulary (no special token), seeded."""
    text = model.config.get_text_config()
    special = {getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special |= {getattr(model.generation_config, k, None) for k in ("bos_token_id", "pad_token_id")}
    eos = model.generation_config.eos_token_id
    special |= set(eos if isinstance(eos, list) else [eos])
    pool = [i for i in range(min(text.vocab_size, 1000)) if i not in special]
    rng = np.random.default_rng(0)
    return [[pool[int(j)] for j in rng.integers(len(pool), size=n)] for n in PROBE_LENGTHS]


def pad_id(model) -> int:
    for value in (
        model.generation_config.pad_token_id,
        model.config.get_text_config().pad_token_id,
        model.generation_config.eos_token_id,
        0,
    ):
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return 0


@contextlib.contextmanager
def rng_kept():
    """The random generators (Python's, numpy's, torch's CPU and CUDA ones) as they were before
    the block: the check seeds its probe, and must not change what a user's seeded run draws."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def first_difference(model) -> str:
    """'' when capture's values on the probe batch equal the independent recomputation, else
    one phrase naming the first that differs (column, layer, row, both values)."""
    greedy = SamplingConfig(max_new_tokens=PROBE_NEW_TOKENS, do_sample=False)
    with rng_kept():
        caps = capture_ids(model, probe_prompts(model), pad_id(model), greedy, seed=0)
    tol = TOLERANCE.get(model.dtype, 1e-4)
    for cap in caps:
        ref = recompute(model, cap.token_ids.tolist(), cap.prompt_len)
        for column in COLUMNS:
            got = np.asarray(cap[column][1:], dtype=np.float64)  # rows 1..T-1
            want = ref[column]
            got = got.reshape(want.shape) if got.size == want.size else got
            if got.shape != want.shape:
                return f"capture's {column} has shape {got.shape} where its forward pass gives {want.shape}"
            # a sketch entry is a sum over the hidden vector: its rounding grows with the vector's norm
            scale = 1 + (ref["hidden_l2_norm"][..., None] if column == "hidden_sketch" else np.abs(want))
            bad = _mismatch(column, got, want, tol * scale, ref["rank_slack"])
            if bad is not None:
                at = f"row {bad[0] + 1}" + (f", layer {bad[1]}" if len(bad) > 1 else "")  # (row, layer[, k])
                return (
                    f"its {column} at {at} is {got[bad]:.6g} under capture but {want[bad]:.6g} in an independent "
                    f"recomputation from its own eager attention weights and block outputs"
                )
    return ""


def _mismatch(column: str, got: np.ndarray, want: np.ndarray, bound: np.ndarray, slack: np.ndarray):
    """The index of the first value farther than `bound` from its recomputation, or None."""
    # both non-finite: an overflowing model, whose summaries capture writes as NaN (with a warning)
    neither = ~np.isfinite(got) & ~np.isfinite(want)
    if column == "token_rank":  # an integer: equal, or within the logits tied with the token's at the dtype's rounding
        off = ~neither & (np.abs(got - want) > np.maximum(slack, 0))
    else:
        off = ~neither & ~(np.abs(got - want) <= bound)
    where = np.argwhere(off)
    return tuple(where[0]) if len(where) else None


def _directions(hidden: int) -> torch.Tensor:
    """The sketch's directions as docs/format.md gives the recipe: randn(hidden, 8) from a CPU
    generator seeded 0, each column scaled to unit length."""
    d = torch.randn(hidden, SKETCH_DIM, generator=torch.Generator().manual_seed(SKETCH_SEED)).double()
    return d / d.norm(dim=0, keepdim=True)


def _forward(model, ids: list[int]):
    """The model's own eager forward pass over `ids` alone: (logits (T, V), block inputs and
    outputs (L + 1, T, d) with the embedding output first, attention weights per layer (h, T, T))."""
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def output(i):
        return lambda m, a, o: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].detach().double().cpu())

    def embedding(m, args, kwargs):
        seen[-1] = (args[0] if args else kwargs["hidden_states"])[0].detach().double().cpu()

    hooks = [b.register_forward_hook(output(i)) for i, b in enumerate(blocks)]
    hooks.append(blocks[0].register_forward_pre_hook(embedding, with_kwargs=True))
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids], device=execution_device(model)), output_attentions=True, use_cache=False
            )
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
    hidden = torch.stack([seen[i] for i in range(-1, len(blocks))])  # (L + 1, T, d)
    attentions = [a[0].detach().double().cpu() for a in out.attentions]  # L x (h, T, T)
    return out.logits[0].detach().double().cpu(), hidden, attentions


def recompute(model, ids: list[int], prompt_len: int) -> dict[str, np.ndarray]:
    """Every recorded column for rows t = 1..T-1 of one sequence, from the model's own tensors:
    (T-1,) per row, (T-1, L) per row and layer, (T-1, L, 8) for the sketch."""
    logits, hidden, attentions = _forward(model, ids)
    z = logits[:-1]  # (T-1, V): position t-1 scores token t
    nxt = torch.tensor(ids[1:])[:, None]  # (T-1, 1)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values  # (T-1, 2)
    own = z.gather(1, nxt)  # (T-1, 1): the token's logit
    out = {
        "logits_entropy": -torch.special.xlogy(p, p).sum(-1),
        "logits_top1_prob": top2[:, 0],
        "logits_top1_top2_margin": top2[:, 0] - top2[:, 1],
        "token_logprob": logp.gather(1, nxt)[:, 0],
        "token_rank": 1 + (z > own).sum(-1).double(),
    }
    band = RANK_BAND.get(model.dtype, TOLERANCE.get(model.dtype, 1e-4))
    out["rank_slack"] = ((z - own).abs() <= band * z.abs().clamp_min(1.0)).sum(-1).double().numpy() - 1
    h, before = hidden[1:, :-1], hidden[:-1, :-1]  # (L, T-1, d): block l's output and input at position t-1
    out.update(
        hidden_mean=h.mean(-1),
        hidden_std=h.std(-1, unbiased=False),
        hidden_l2_norm=h.norm(dim=-1),
        hidden_max_abs=h.abs().amax(-1),
        hidden_cos_prev=(h * before).sum(-1) / (h.norm(dim=-1) * before.norm(dim=-1)),
    )
    out["hidden_sketch"] = (h @ _directions(h.shape[-1])).permute(1, 0, 2)  # (T-1, L, 8)
    for k in ("hidden_mean", "hidden_std", "hidden_l2_norm", "hidden_max_abs", "hidden_cos_prev"):
        out[k] = out[k].T  # (T-1, L)
    stats = [_attention_rows(w[:, :-1], prompt_len) for w in attentions]  # per layer: (T-1,) each; heads may differ
    for k in stats[0]:
        out[k] = torch.stack([layer[k] for layer in stats], dim=1)  # (T-1, L)
    return {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in out.items()}


def _attention_rows(a: torch.Tensor, prompt_len: int) -> dict[str, torch.Tensor]:
    """One layer's weights (h, T-1, T), query position t-1 over its keys -> each attention
    column for rows 1..T-1, (T-1,)."""
    ent = -torch.special.xlogy(a, a).sum(-1)  # (h, T-1)
    t = a.shape[1]
    prev = torch.full((a.shape[0], t), float("nan"), dtype=torch.float64)  # (h, T-1)
    if t > 1:
        q = torch.arange(1, t)
        prev[:, 1:] = a[:, q, q - 1]
    return {
        "attn_entropy_mean": ent.mean(0),
        "attn_entropy_min": ent.amin(0),
        "attn_concentration_max": a.amax(dim=(0, 2)),
        "attn_sink_mass": a[..., 0].mean(0),
        "attn_prev_mass": prev.mean(0),
        "attn_prompt_mass": a[..., :prompt_len].sum(-1).mean(0),
    }
