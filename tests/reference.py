"""An independent recomputation of every Parquet row from one teacher-forced forward pass.

It shares no code with corevital's capture: eager attention returns the weights, forward
hooks written here read each block's output, and the metrics are recomputed in float64
numpy with explicit loops, following the definitions in the README / contract.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM

METRICS = ["logits_entropy", "logits_top1_prob", "logits_top1_top2_margin", "token_logprob",
           "hidden_mean", "hidden_std", "hidden_l2_norm", "hidden_max_abs",
           "attn_entropy_mean", "attn_entropy_min", "attn_concentration_max"]


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


def reference_frame(model_dir, token_ids: list[int], dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """Rows (step_index, layer_index, metrics...) for t = 1..T-1 of one token sequence, the
    model run in `dtype` (its tensors upcast to float64 for the metrics). `model_dir` may also
    be a loaded model already set to eager attention."""
    model = model_dir if isinstance(model_dir, torch.nn.Module) else \
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype).eval()
    outputs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
             for i, b in enumerate(_blocks(model))]
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
        logit_vals = dict(logits_entropy=_entropy(p), logits_top1_prob=top[0], logits_top1_top2_margin=top[0] - top[1],
                          token_logprob=logp[token_ids[t]])
        for layer in range(len(outputs)):
            h = outputs[layer][0, pos].double().numpy()
            w = out.attentions[layer][0, :, pos, :t].double().numpy()  # (heads, keys 0..t-1)
            ents = [_entropy(w[head]) for head in range(w.shape[0])]
            rows.append(dict(step_index=t, layer_index=layer, **logit_vals,
                             hidden_mean=h.mean(), hidden_std=h.std(ddof=0), hidden_l2_norm=np.sqrt((h * h).sum()),
                             hidden_max_abs=np.abs(h).max(), attn_entropy_mean=np.mean(ents), attn_entropy_min=np.min(ents),
                             attn_concentration_max=w.max(), hidden_sketch=h @ directions))
    return pd.DataFrame(rows)


def assert_matches_reference(rows: pd.DataFrame, model_dir: str, tol: float = 1e-4, dtype: torch.dtype = torch.float32) -> int:
    """Compare one trace's Parquet rows with the reference; returns the number of values compared."""
    rows = rows.sort_values(["step_index", "layer_index"])
    token_ids = rows.groupby("step_index")["token_id"].first().tolist()
    ref = reference_frame(model_dir, token_ids, dtype)
    got = rows[rows.step_index > 0].reset_index(drop=True)
    assert len(got) == len(ref)
    assert (got.step_index.values == ref.step_index.values).all() and (got.layer_index.values == ref.layer_index.values).all()
    for col in METRICS:
        np.testing.assert_allclose(got[col].to_numpy(np.float64), ref[col].to_numpy(np.float64), rtol=tol, atol=tol, err_msg=col)
    np.testing.assert_allclose(np.stack(got.hidden_sketch.to_numpy()), np.stack(ref.hidden_sketch.to_numpy()),
                               rtol=tol, atol=tol * max(1.0, float(np.abs(np.stack(ref.hidden_sketch)).max())), err_msg="hidden_sketch")
    first = rows[rows.step_index == 0]
    assert first[METRICS].isna().all().all() and first.hidden_sketch.isna().all()
    return len(got) * (len(METRICS) + 8)
