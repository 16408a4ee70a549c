"""Synthetic captures and trace tables: signal, flag and evaluation tests without a model."""

from __future__ import annotations

import numpy as np

from corevital.core import metrics
from corevital.core.prompts import Prompt
from corevital.core.sequence import SequenceCapture
from corevital.output.trace import GenerationInfo, RunConfigInfo
from corevital.output.tracedoc import TraceHeader


def clean_capture(P: int = 20, G: int = 12, L: int = 6, seed: int = 0, vocab: int = 300) -> SequenceCapture:
    """A capture with unremarkable values: distinct tokens, steady entropies and norms, row 0 NaN
    (-1 for integers), every default metric of metrics.py (the lens off)."""
    rng = np.random.default_rng(seed)
    T = P + G
    ids = rng.permutation(vocab)[:T].astype(np.int64)
    values = {
        "logits_entropy": rng.uniform(1.0, 2.0, T),
        "logits_top1_prob": rng.uniform(0.3, 0.6, T),
        "logits_top1_top2_margin": rng.uniform(0.0, 0.3, T),
        "token_logprob": rng.uniform(-3.0, -0.1, T),
        "hidden_mean": rng.normal(0, 0.1, (T, L)),
        "hidden_std": rng.uniform(0.9, 1.1, (T, L)),
        "hidden_l2_norm": rng.uniform(10, 12, (T, L)) * np.arange(1, L + 1),
        "hidden_max_abs": rng.uniform(3, 4, (T, L)),
        "attn_entropy_mean": rng.uniform(0.8, 2.0, (T, L)),
        "attn_entropy_min": rng.uniform(0.1, 0.5, (T, L)),
        "attn_concentration_max": rng.uniform(0.4, 0.9, (T, L)),
        "hidden_sketch": rng.normal(size=(T, L, 8)),
        **{
            name: rng.uniform(0.05, 0.6, (T, L))
            for name in ("attn_sink_mass", "attn_prev_mass", "attn_prompt_mass", "hidden_cos_prev")
        },
    }
    values = {k: v.astype(np.float32) for k, v in values.items()}
    for v in values.values():
        v[0] = np.nan
    values["attn_prev_mass"][1] = np.nan
    values["token_rank"] = rng.integers(1, 20, T)
    values["token_rank"][0] = -1
    assert set(values) == {m.column for m in metrics.METRICS if m.reducer != "lens"}
    return SequenceCapture(
        prompt_len=P,
        token_ids=ids,
        values=values,
        topk_ids=np.tile(np.arange(5), (T, 1)),
        topk_probs=np.full((T, 5), 0.1, np.float32),
        elapsed_ms=5,
    )


def header(
    prompt_index: int = 0,
    model: str = "m",
    answer=None,
    grader=None,
    source: str = "p.jsonl",
    trace_id: str | None = None,
    seed: int = 1,
) -> TraceHeader:
    info = {
        "name": model,
        "hf_id": f"/models/{model}",
        "revision": "sha256:0",
        "architecture": "X",
        "num_layers": 6,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "tokenizer_hf_id": "t",
        "dtype": "float32",
        "device": "cpu",
    }
    rc = RunConfigInfo(
        seed=seed,
        device_requested="cpu",
        max_new_tokens=16,
        batch_size=1,
        generation=GenerationInfo(do_sample=True, temperature=0.8, top_k=50, top_p=0.95),
        prompt_source=source,
        prompt_index=prompt_index,
        sketch={},
        sink={},
    )
    prompt = Prompt(
        prompt_index, f"question {prompt_index}", None, source, None if answer is None else tuple(answer), grader
    )
    return TraceHeader(trace_id or f"{model}-{seed}-{prompt_index}", "2026-01-01T00:00:00.000+00:00", info, rc, prompt)


class FakeTokenizer:
    """Token i decodes to "w<i> "."""

    def __len__(self):
        return 300

    def batch_decode(self, ids):
        return [f"w{i[0]} " for i in ids]

    def decode(self, ids):
        return "".join(f"w{i} " for i in ids)
