"""An independent recomputation of every Parquet row from one teacher-forced forward pass.

It shares no code with corevital's capture: eager attention returns the weights, forward
hooks written here read each block's output, and the metrics are recomputed in float64
numpy with explicit loops, following the definitions in docs/format.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM

METRICS = [
    "logits_entropy",
    "logits_top1_prob",
    "logits_top1_top2_margin",
    "token_logprob",
    "hidden_mean",
    "hidden_std",
    "hidden_l2_norm",
    "hidden_max_abs",
    "attn_entropy_mean",
    "attn_entropy_min",
    "attn_concentration_max",
    "token_rank",
    "attn_sink_mass",
    "attn_prev_mass",
    "attn_prompt_mass",
    "hidden_cos_prev",
]  # docs/format.md
# metrics.per_head (docs/format.md, "Per-head attention"): one value per query head
HEAD_METRICS = ["head_attn_entropy", "head_sink_mass", "head_prev_mass", "head_prompt_mass", "head_self_mass"]


def _blocks(model):
    """The model's transformer blocks: the one ModuleList of num_hidden_layers modules in its base model."""
    n = model.config.get_text_config().num_hidden_layers
    lists = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    assert lists, f"no list of {n} blocks in {type(model).__name__}"
    return list(lists[0])


def _directions(hidden_size: int) -> np.ndarray:
    """The documented sketch recipe: randn(hidden, 8) from a CPU generator seeded 0, unit columns."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(hidden_size, 8, generator=g).double().numpy()
    return d / np.linalg.norm(d, axis=0, keepdims=True)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def reference_frame(
    model_dir,
    token_ids: list[int],
    dtype: torch.dtype = torch.float32,
    prompt_len: int | None = None,
    rank_band: float = 0.0,
    blocks=None,
) -> pd.DataFrame:
    """Rows (step_index, layer_index, metrics...) for t = 1..T-1 of one token sequence, the
    model run in `dtype` (its tensors upcast to float64 for the metrics). `model_dir` may also
    be a loaded model already set to eager attention. `prompt_len` P (default: every token)
    bounds the prompt keys of attn_prompt_mass. `rank_band`: token_rank_slack counts the other
    logits within rank_band x max(1, |logit|) of the token's (two runs in low precision round
    them differently, so either may rank above the other). `blocks`: the model's blocks, where the
    test knows them better than the one list of their number (a multimodal model's towers)."""
    P = len(token_ids) if prompt_len is None else prompt_len
    model = (
        model_dir
        if isinstance(model_dir, torch.nn.Module)
        else AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype).eval()
    )
    outputs = {}
    blocks = _blocks(model) if blocks is None else list(blocks)
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
        for i, b in enumerate(blocks)
    ]
    hooks.append(
        blocks[0].register_forward_pre_hook(  # the embedding output, as block 0 reads it
            lambda m, a, kw: outputs.__setitem__(-1, a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
    )
    with torch.no_grad():
        out = model(torch.tensor([token_ids]), output_attentions=True)
    for h in hooks:
        h.remove()
    logits = out.logits[0].double().numpy()  # (T, V)
    directions = _directions(model.config.get_text_config().hidden_size)
    rows = []
    for t in range(1, len(token_ids)):
        pos = t - 1
        z = logits[pos] - logits[pos].max()
        logp = z - np.log(np.exp(z).sum())
        p = np.exp(logp)
        top = np.sort(p)[::-1]
        logit_vals = dict(
            logits_entropy=_entropy(p),
            logits_top1_prob=top[0],
            logits_top1_top2_margin=top[0] - top[1],
            token_logprob=logp[token_ids[t]],
            token_rank=1 + sum(int(x > logits[pos][token_ids[t]]) for x in logits[pos]),
            token_rank_slack=sum(
                int(abs(x - logits[pos][token_ids[t]]) <= rank_band * max(1.0, abs(x))) for x in logits[pos]
            )
            - 1,
        )
        for layer in range(len(outputs) - 1):
            h = outputs[layer][0, pos].double().numpy()
            before = (
                outputs[layer - 1][0, pos].double().numpy()
            )  # block l's input: block l-1's output, or the embeddings
            w = out.attentions[layer][0, :, pos, :t].double().numpy()  # (heads, keys 0..t-1)
            ents = [_entropy(w[head]) for head in range(w.shape[0])]
            masses = dict(
                attn_sink_mass=np.mean([w[head, 0] for head in range(w.shape[0])]),
                attn_prev_mass=np.mean([w[head, pos - 1] for head in range(w.shape[0])]) if pos >= 1 else np.nan,
                attn_prompt_mass=np.mean([w[head, :P].sum() for head in range(w.shape[0])]),
                hidden_cos_prev=(h @ before) / np.sqrt((h @ h) * (before @ before)),
                # per head, written out one head at a time
                head_attn_entropy=np.array(ents),
                head_sink_mass=np.array([w[head, 0] for head in range(w.shape[0])]),
                head_prev_mass=np.array([w[head, pos - 1] if pos >= 1 else np.nan for head in range(w.shape[0])]),
                head_prompt_mass=np.array([w[head, :P].sum() for head in range(w.shape[0])]),
                head_self_mass=np.array([w[head, pos] for head in range(w.shape[0])]),
            )
            rows.append(
                dict(
                    step_index=t,
                    layer_index=layer,
                    **logit_vals,
                    hidden_mean=h.mean(),
                    hidden_std=h.std(ddof=0),
                    hidden_l2_norm=np.sqrt((h * h).sum()),
                    hidden_max_abs=np.abs(h).max(),
                    attn_entropy_mean=np.mean(ents),
                    attn_entropy_min=np.min(ents),
                    attn_concentration_max=w.max(),
                    hidden_sketch=h @ directions,
                    **masses,
                )
            )
    return pd.DataFrame(rows)


def assert_matches_reference(
    rows: pd.DataFrame, model_dir: str, tol: float = 1e-4, dtype: torch.dtype = torch.float32
) -> int:
    """Compare one trace's Parquet rows with the reference; returns the number of values compared."""
    rows = rows.sort_values(["step_index", "layer_index"])
    token_ids = rows.groupby("step_index")["token_id"].first().tolist()
    ref = reference_frame(
        model_dir,
        token_ids,
        dtype,
        int(rows.groupby("step_index")["is_prompt_token"].first().sum()),
        rank_band=0.0 if dtype == torch.float32 else tol,
    )
    got = rows[rows.step_index > 0].reset_index(drop=True)
    assert len(got) == len(ref)
    assert (got.step_index.values == ref.step_index.values).all() and (
        got.layer_index.values == ref.layer_index.values
    ).all()
    for col in METRICS:
        if col == "token_rank":  # an integer: equal, or within the logits tied with the token's to the dtype's rounding
            assert (
                np.abs(got[col].to_numpy(np.float64) - ref[col].to_numpy(np.float64)) <= ref.token_rank_slack
            ).all(), col
            continue
        np.testing.assert_allclose(
            got[col].to_numpy(np.float64), ref[col].to_numpy(np.float64), rtol=tol, atol=tol, err_msg=col
        )
    np.testing.assert_allclose(
        np.stack(got.hidden_sketch.to_numpy()),
        np.stack(ref.hidden_sketch.to_numpy()),
        rtol=tol,
        atol=tol * max(1.0, float(np.abs(np.stack(ref.hidden_sketch)).max())),
        err_msg="hidden_sketch",
    )
    first = rows[rows.step_index == 0]
    assert first[METRICS].isna().all().all() and first.hidden_sketch.isna().all()
    return len(got) * (len(METRICS) + 8)
