"""Trace schema: the canonical JSON document written per prompt (schema_version 1.0.0).

Layout follows the seed project's trace: schema_version, trace_id, created_at_utc, model,
run_config, prompt, generated, timeline, summary, warnings, extensions. Timeline row t
(0 <= t < P + G) carries the forward pass at query position t - 1 (see README, "Timeline").
Row 0 has no such pass: its `logits_summary` is null, and so are its layers' summaries.
Float values that are NaN or infinite are written as null.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from corevital import SCHEMA_VERSION
from corevital.capture import SequenceCapture
from corevital.prompts import Prompt


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TopKItem(_Model):
    token_id: int
    token_text: str
    prob: float


class LogitsSummary(_Model):
    """The raw next-token distribution at position t - 1 (before temperature, top-k, top-p)."""
    entropy: Optional[float] = Field(description="-sum p log p, nats")
    top1_prob: Optional[float]
    top1_top2_margin: Optional[float] = Field(description="largest p minus second largest p")
    token_logprob: Optional[float] = Field(description="log p of this row's token")
    topk: list[TopKItem] = Field(description="the 5 most likely tokens")


class HiddenSummary(_Model):
    """Output of transformer block l (before the final norm) at position t - 1."""
    mean: Optional[float]
    std: Optional[float] = Field(description="population std (ddof 0)")
    l2_norm: Optional[float]
    max_abs: Optional[float]
    sketch: list[Optional[float]] = Field(description="projection onto 8 fixed unit directions")


class AttentionSummary(_Model):
    """Layer l's attention weights of query t - 1 over keys 0..t-1 (padding excluded)."""
    entropy_mean: Optional[float] = Field(description="mean over heads of the entropy over keys, nats")
    entropy_min: Optional[float] = Field(description="min over heads of the entropy over keys, nats")
    concentration_max: Optional[float] = Field(description="largest single weight over heads and keys")


class LayerSummary(_Model):
    layer_index: int
    hidden_summary: Optional[HiddenSummary]
    attention_summary: Optional[AttentionSummary]


class TokenInfo(_Model):
    token_id: int
    token_text: str
    is_prompt_token: bool


class TimelineStep(_Model):
    step_index: int
    token: TokenInfo
    logits_summary: Optional[LogitsSummary]
    layers: list[LayerSummary]
    extensions: dict[str, Any] = Field(default_factory=dict)


class ModelInfo(_Model):
    name: str = Field(description="the config choice, e.g. smollm2")
    hf_id: str = Field(description="what was loaded: hub id, path, or embedded:<dist>/<file>")
    revision: Optional[str] = Field(description="hub commit, else sha256 of the weights")
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    tokenizer_hf_id: str
    dtype: str
    device: str


class GenerationInfo(_Model):
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float


class RunConfigInfo(_Model):
    seed: int
    device_requested: str
    max_new_tokens: int
    batch_size: int
    generation: GenerationInfo
    prompt_source: str
    prompt_index: int
    sketch: dict[str, Any]
    sink: dict[str, Any]


class PromptInfo(_Model):
    text: str
    token_ids: list[int]
    num_tokens: int
    index: int
    id: Optional[str]
    source: str


class GeneratedInfo(_Model):
    output_text: str
    token_ids: list[int]
    num_tokens: int


class Summary(_Model):
    prompt_tokens: int
    generated_tokens: int
    total_steps: int
    num_layers: int
    elapsed_ms: int = Field(description="wall time of the generate call that produced this trace (its whole batch)")


class TraceWarning(_Model):
    code: str
    message: str


class Trace(_Model):
    schema_version: str = SCHEMA_VERSION
    trace_id: str
    created_at_utc: str
    model: ModelInfo
    run_config: RunConfigInfo
    prompt: PromptInfo
    generated: GeneratedInfo
    timeline: list[TimelineStep]
    summary: Summary
    warnings: list[TraceWarning] = Field(default_factory=list)
    extensions: dict[str, Any] = Field(default_factory=dict)


def _f(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def build_trace(cap: SequenceCapture, prompt: Prompt, decode: Callable[[list[int]], str],
                token_texts: Callable[[np.ndarray], list[str]], model: ModelInfo, run_config: RunConfigInfo) -> Trace:
    """Assemble one prompt's trace from its capture. `token_texts` decodes an id array one token each."""
    P, T, L = cap.prompt_len, len(cap.token_ids), cap.hidden.shape[1]
    texts = token_texts(cap.token_ids)
    top_texts = np.array(token_texts(cap.topk_ids[1:].reshape(-1)), dtype=object).reshape(-1, cap.topk_ids.shape[1])
    timeline = [TimelineStep.model_construct(
        step_index=t,
        token=TokenInfo.model_construct(token_id=int(cap.token_ids[t]), token_text=texts[t], is_prompt_token=t < P),
        logits_summary=None if t == 0 else _logits(cap, t, top_texts[t - 1]),
        layers=[_layer(cap, t, l) for l in range(L)],
        extensions={},
    ) for t in range(T)]
    ids = [int(i) for i in cap.token_ids]
    return Trace.model_construct(
        schema_version=SCHEMA_VERSION,
        trace_id=uuid.uuid4().hex,
        created_at_utc=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        model=model, run_config=run_config,
        prompt=PromptInfo(text=prompt.text, token_ids=ids[:P], num_tokens=P, index=prompt.index, id=prompt.id, source=prompt.source),
        generated=GeneratedInfo(output_text=decode(ids[P:]), token_ids=ids[P:], num_tokens=T - P),
        timeline=timeline,
        summary=Summary(prompt_tokens=P, generated_tokens=T - P, total_steps=T, num_layers=L, elapsed_ms=cap.elapsed_ms),
        warnings=[], extensions={},
    )


def _logits(cap: SequenceCapture, t: int, top_texts) -> LogitsSummary:
    s = cap.logit_stats[t]
    topk = [TopKItem.model_construct(token_id=int(i), token_text=txt, prob=_f(p))
            for i, txt, p in zip(cap.topk_ids[t], top_texts, cap.topk_probs[t])]
    return LogitsSummary.model_construct(entropy=_f(s[0]), top1_prob=_f(s[1]), top1_top2_margin=_f(s[2]),
                                         token_logprob=_f(cap.token_logprob[t]), topk=topk)


def _layer(cap: SequenceCapture, t: int, l: int) -> LayerSummary:
    if t == 0:
        return LayerSummary.model_construct(layer_index=l, hidden_summary=None, attention_summary=None)
    h, a = cap.hidden[t, l], cap.attn[t, l]
    return LayerSummary.model_construct(
        layer_index=l,
        hidden_summary=HiddenSummary.model_construct(mean=_f(h[0]), std=_f(h[1]), l2_norm=_f(h[2]), max_abs=_f(h[3]),
                                                     sketch=[_f(x) for x in cap.sketch[t, l]]),
        attention_summary=AttentionSummary.model_construct(entropy_mean=_f(a[0]), entropy_min=_f(a[1]), concentration_max=_f(a[2])),
    )
