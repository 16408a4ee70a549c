"""The JSON trace as a plain dict: the specification of the document's structure.

This is the trace written the obvious way, one nested dict per step and layer, serialised by
one orjson call. It is the reference the fast renderer (tracedoc.render, which copies
formatted numbers between byte templates) must equal byte for byte, and it is readable: the
keys below, in this order, are the document (docs/format.md describes each). Too slow for a
job's traces (a Python dict per (step, layer)), so jobs use tracedoc; tests hold the two equal.

Values: float metrics as float32 (orjson writes a float32's shortest round-trip text), NaN
and Inf as null; integers as integers; flags as true / false (null where not computed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from corevital import SCHEMA_VERSION
from corevital.assess import health
from corevital.core import metrics
from corevital.core.sequence import SequenceCapture
from corevital.output.vocab import Vocabulary


def render_plain(cap: SequenceCapture, header, vocab: Vocabulary, output_text: str, assessment=None) -> bytes:
    """The trace's UTF-8 JSON bytes, as tracedoc.render writes them (same arguments)."""
    return orjson.dumps(document(cap, header, vocab, output_text, assessment), option=orjson.OPT_SERIALIZE_NUMPY)


def document(
    cap: SequenceCapture,
    header,
    vocab: Vocabulary,
    output_text: str,
    assessment: health.Assessment | None = None,
) -> dict[str, Any]:
    """The whole trace of one capture; `header`: tracedoc.TraceHeader."""
    assessment = assessment or health.assess(cap)
    timeline = {"timeline": [step(cap, vocab, s) for s in range(len(cap.token_ids))]}
    return {**head(cap, header, output_text), **timeline, **tail(cap, header, assessment)}


def head(cap: SequenceCapture, header, output_text: str) -> dict[str, Any]:
    """The keys before the timeline: where the trace came from, its prompt and its output."""
    P, T, ids = cap.prompt_len, len(cap.token_ids), [int(i) for i in cap.token_ids]
    prompt = header.prompt
    return {
        "schema_version": SCHEMA_VERSION,
        "trace_id": header.trace_id,
        "created_at_utc": header.created_at_utc,
        "model": header.model,
        "run_config": header.run_config.model_dump(),
        "prompt": {
            "text": prompt.text,
            "token_ids": ids[:P],
            "num_tokens": P,
            "index": prompt.index,
            "id": prompt.id,
            "source": prompt.source,
            "answer": None if prompt.answer is None else list(prompt.answer),
            "grader": prompt.grader,
        },
        "generated": {"output_text": output_text, "token_ids": ids[P:], "num_tokens": T - P},
    }


def tail(cap: SequenceCapture, header, assessment: health.Assessment) -> dict[str, Any]:
    """The keys after the timeline: the signals (in `summary`), the health flags, the warnings."""
    return {
        "summary": {
            "prompt_tokens": cap.prompt_len,
            "total_steps": len(cap.token_ids),
            "num_layers": cap.num_layers,
            "elapsed_ms": cap.elapsed_ms,
            **{k: None if v is None or not np.isfinite(v) else v for k, v in assessment.signals.items()},
        },
        "health": {name: e.dump() for name, e in assessment.flags.items()},
        "warnings": [w.model_dump() for w in header.warnings],
        "extensions": {},
    }


def step(cap: SequenceCapture, vocab: Vocabulary, s: int) -> dict[str, Any]:
    """Timeline row `s`: its token, the next-token distribution's summary that chose it (none for
    row 0: no forward pass precedes it) and one object per layer."""
    token_id = int(cap.token_ids[s])
    token = {"token_id": token_id, "token_text": _text(vocab, token_id), "is_prompt_token": s < cap.prompt_len}
    groups = layer_groups(cap)
    if s == 0:
        layers = [{"layer_index": l, **{g: None for g, _ in groups}} for l in range(cap.num_layers)]
        return {"step_index": 0, "token": token, "logits_summary": None, "layers": layers, "extensions": {}}
    declared = metrics.all_metrics(cap.extras)
    logits = {m.key: _value(m, cap.values[m.column][s]) for m in declared if _of(m, metrics.STEP_GROUP, cap)}
    logits["topk"] = [
        {"token_id": int(i), "token_text": _text(vocab, int(i)), "prob": np.float32(p)}
        for i, p in zip(cap.topk_ids[s], cap.topk_probs[s])
    ]
    return {
        "step_index": s,
        "token": token,
        metrics.STEP_GROUP: logits,
        "layers": [_layer(cap, groups, s, l) for l in range(cap.num_layers)],
        "extensions": {},
    }


def _layer(cap: SequenceCapture, groups, s: int, l: int) -> dict[str, Any]:
    """Layer `l` at row `s`: each group's object of its metrics; an optional group (the lens, user
    metrics) is null where none of its metrics has a value."""
    out: dict[str, Any] = {"layer_index": l}
    for group, declared in groups:
        present = [m for m in declared if m.column in cap.values]
        fields = {m.key: _value(m, cap.values[m.column][s, l]) for m in present}
        optional = group in metrics.OPTIONAL_GROUPS or group == metrics.EXTENSIONS
        has_value = any(not np.isnan(np.asarray(cap.values[m.column][s, l], np.float32)).all() for m in present)
        heads = head_metrics(cap, group)
        if heads:
            each = {m.key: _value(m, cap.values[m.column][s, l]) for m in heads}
            fields[metrics.HEADS] = None if all(np.isnan(cap.values[m.column][s, l]).all() for m in heads) else each
        out[group] = None if optional and not has_value else fields
    return out


def head_metrics(cap: SequenceCapture, group: str) -> list[metrics.Metric]:
    """The per-head metrics (metrics.per_head) that `group`'s object holds as its `heads` object:
    those captured, in attention_summary; none elsewhere."""
    if group != metrics.A:  # attention_summary
        return []
    return [m for m in metrics.all_metrics(cap.extras) if m.group == metrics.HEADS and m.column in cap.values]


def layer_groups(cap: SequenceCapture) -> list[tuple[str, list[metrics.Metric]]]:
    """A layer object's groups in order: the declared ones, then `extensions` for user metrics."""
    declared = metrics.all_metrics(cap.extras)
    groups = [(g, [m for m in declared if m.group == g]) for g in metrics.LAYER_GROUPS]
    extra = [m for m in declared if m.group == metrics.EXTENSIONS]
    return groups + ([(metrics.EXTENSIONS, extra)] if extra else [])


def _of(m: metrics.Metric, group: str, cap: SequenceCapture) -> bool:
    return m.group == group and m.column in cap.values


def _value(m: metrics.Metric, v) -> Any:
    """One metric's value as the JSON holds it."""
    if m.type == metrics.BOOL:
        return None if np.isnan(v) else bool(v > 0.5)
    if m.type == metrics.I32:
        return int(v)
    if m.width is not None:  # a vector
        return [np.float32(x) for x in np.asarray(v).reshape(-1)]
    return np.float32(v)


def _text(vocab: Vocabulary, token_id: int) -> str:
    return vocab.arrow[token_id].as_py()
