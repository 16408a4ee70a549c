"""Parquet tables: the flattened form of the JSON traces.

`summaries.parquet` (`SCHEMA`): one row per (trace, step, layer), the contract's column list
plus `prompt_id`. `traces.parquet` (`TRACES_SCHEMA`): one row per trace, for analysis that
starts from whole generations, with the trace's signals (signals.py) and health flags
(health.py) as columns, derived from their declarations. Both files' key-value metadata hold `schema_version` and the
job's resolved config as JSON (`corevital_config`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from corevital import health, signals
from corevital.capture import SequenceCapture
from corevital.tracedoc import TraceHeader
from corevital.vocab import Vocabulary

F32 = pa.float32()
SCHEMA = pa.schema([
    ("trace_id", pa.string()), ("model", pa.string()), ("model_id", pa.string()),
    ("model_revision", pa.string()), ("prompt_source", pa.string()), ("seed", pa.int64()),
    ("prompt_index", pa.int32()), ("sample_index", pa.int32()), ("step_index", pa.int32()), ("layer_index", pa.int32()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()), ("max_new_tokens", pa.int32()),
    ("do_sample", pa.bool_()), ("is_prompt_token", pa.bool_()), ("token_id", pa.int64()), ("token_text", pa.string()),
    ("logits_entropy", F32), ("logits_top1_prob", F32), ("logits_top1_top2_margin", F32), ("token_logprob", F32),
    ("hidden_mean", F32), ("hidden_std", F32), ("hidden_l2_norm", F32), ("hidden_max_abs", F32),
    ("attn_entropy_mean", F32), ("attn_entropy_min", F32), ("attn_concentration_max", F32),
    ("hidden_sketch", pa.list_(F32)),
    # contract v2 section 9
    ("token_rank", pa.int32()), ("attn_sink_mass", F32), ("attn_prev_mass", F32), ("attn_prompt_mass", F32),
    ("hidden_cos_prev", F32), ("lens_entropy", F32), ("lens_top1_match", pa.bool_()), ("lens_kl", F32),
    ("prompt_id", pa.string()),
])
STEP_METRICS = ("logits_entropy", "logits_top1_prob", "logits_top1_top2_margin", "token_logprob")
TRACES_SCHEMA = pa.schema([
    ("trace_id", pa.string()), ("model", pa.string()), ("model_id", pa.string()), ("model_revision", pa.string()),
    ("prompt_source", pa.string()), ("prompt_id", pa.string()), ("seed", pa.int64()), ("prompt_index", pa.int32()),
    ("sample_index", pa.int32()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()), ("max_new_tokens", pa.int32()),
    ("do_sample", pa.bool_()), ("prompt_text", pa.string()), ("output_text", pa.string()),
    ("answer", pa.list_(pa.string())), ("grader", pa.string()),  # the .jsonl line's accepted answers and grader, if any
    ("prompt_tokens", pa.int32()), ("num_layers", pa.int32()), ("elapsed_ms", pa.int64()),
    *((s.name, s.type) for s in signals.SIGNALS),  # declared in signals.py (generated_tokens, mean_token_logprob, ...)
    *((f"prompt_mean_{m}", F32) for m in STEP_METRICS),  # over prompt rows 1..P-1 (row 0 has no pass)
    *((f.column, pa.bool_()) for f in health.FLAGS),  # declared in health.py
    ("warnings", pa.list_(pa.string())),  # "<code>: <message>" per warning of the trace
])
METADATA_CONFIG_KEY = "corevital_config"


def _const(value, n: int, typ: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, typ), n) if value is not None else pa.nulls(n, typ)


def trace_table(cap: SequenceCapture, header: TraceHeader, vocab: Vocabulary) -> pa.Table:
    """The (P + G) x L rows of one trace, step-major; row-0 metrics are null."""
    T, L = cap.hidden.shape[:2]
    n = T * L
    step = np.repeat(np.arange(T, dtype=np.int32), L)  # (n,)
    null = step == 0  # (n,) rows without a forward pass
    rc, gen, model = header.run_config, header.run_config.generation, header.model

    def per_step(values):  # (T,) -> (n,), null on row 0
        return pa.array(np.repeat(values.astype(np.float32), L), F32, mask=null)

    def per_layer(values):  # (T, L) -> (n,), null on row 0
        return pa.array(values.reshape(n).astype(np.float32), F32, mask=null)

    def per_layer_or_null(values):  # (T, L) -> (n,), null on row 0 and wherever the value is undefined (NaN)
        flat = values.reshape(n).astype(np.float32)
        return pa.array(flat, F32, mask=null | np.isnan(flat))

    lens = cap.lens if cap.lens is not None else np.full((T, L, 3), np.nan, np.float32)  # (T, L, 3)
    lens_off = np.isnan(lens[..., 1]).reshape(n)  # (n,) rows where the lens is off (row 0 among them)
    sketch_values = pa.array(cap.sketch.reshape(-1).astype(np.float32), F32)
    offsets = pa.array(np.arange(0, n * cap.sketch.shape[-1] + 1, cap.sketch.shape[-1], dtype=np.int32))
    token_ids = np.repeat(cap.token_ids, L)  # (n,)
    columns = {
        "trace_id": _const(header.trace_id, n, pa.string()),
        "model": _const(model["name"], n, pa.string()),
        "model_id": _const(model["hf_id"], n, pa.string()),
        "model_revision": _const(model["revision"], n, pa.string()),
        "prompt_source": _const(rc.prompt_source, n, pa.string()),
        "seed": _const(rc.seed, n, pa.int64()),
        "prompt_index": _const(rc.prompt_index, n, pa.int32()),
        "sample_index": _const(rc.sample_index, n, pa.int32()),
        "step_index": pa.array(step, pa.int32()),
        "layer_index": pa.array(np.tile(np.arange(L, dtype=np.int32), T), pa.int32()),
        "temperature": _const(gen.temperature, n, pa.float64()),
        "top_p": _const(gen.top_p, n, pa.float64()),
        "top_k": _const(gen.top_k, n, pa.int32()),
        "max_new_tokens": _const(rc.max_new_tokens, n, pa.int32()),
        "do_sample": _const(gen.do_sample, n, pa.bool_()),
        "is_prompt_token": pa.array(step < cap.prompt_len, pa.bool_()),
        "token_id": pa.array(token_ids, pa.int64()),
        "token_text": vocab.arrow.take(pa.array(token_ids)),
        "logits_entropy": per_step(cap.logit_stats[:, 0]),
        "logits_top1_prob": per_step(cap.logit_stats[:, 1]),
        "logits_top1_top2_margin": per_step(cap.logit_stats[:, 2]),
        "token_logprob": per_step(cap.token_logprob),
        "hidden_mean": per_layer(cap.hidden[..., 0]),
        "hidden_std": per_layer(cap.hidden[..., 1]),
        "hidden_l2_norm": per_layer(cap.hidden[..., 2]),
        "hidden_max_abs": per_layer(cap.hidden[..., 3]),
        "attn_entropy_mean": per_layer(cap.attn[..., 0]),
        "attn_entropy_min": per_layer(cap.attn[..., 1]),
        "attn_concentration_max": per_layer(cap.attn[..., 2]),
        "hidden_sketch": pa.ListArray.from_arrays(offsets, sketch_values, type=pa.list_(F32), mask=pa.array(null)),
        "token_rank": pa.array(np.repeat(cap.token_rank, L).astype(np.int32), pa.int32(), mask=null),
        "attn_sink_mass": per_layer_or_null(cap.attn_sink_mass),
        "attn_prev_mass": per_layer_or_null(cap.attn_prev_mass),
        "attn_prompt_mass": per_layer_or_null(cap.attn_prompt_mass),
        "hidden_cos_prev": per_layer_or_null(cap.hidden_cos_prev),
        "lens_entropy": per_layer_or_null(lens[..., 0]),
        "lens_top1_match": pa.array(lens[..., 1].reshape(n) > 0.5, pa.bool_(), mask=null | lens_off),
        "lens_kl": per_layer_or_null(lens[..., 2]),
        "prompt_id": _const(header.prompt.id, n, pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def trace_row(cap: SequenceCapture, header: TraceHeader, output_text: str,
              assessment: health.Assessment | None = None) -> dict:
    """One trace as one row of `traces.parquet` (see traces_table); a mean over no rows (or only NaN) is null.
    `assessment`: the trace's signals and flags (computed here, with the default thresholds, when None)."""
    rc, gen, P = header.run_config, header.run_config.generation, cap.prompt_len
    steps = np.column_stack([cap.logit_stats, cap.token_logprob])  # (T, 4), in STEP_METRICS order

    def means(rows: np.ndarray) -> list[float | None]:
        finite = np.isfinite(rows)
        counts = finite.sum(0)
        sums = np.where(finite, rows, 0).astype(np.float64).sum(0)
        return [float(s / c) if c else None for s, c in zip(sums, counts)]

    row = {
        "trace_id": header.trace_id, "model": header.model["name"], "model_id": header.model["hf_id"],
        "model_revision": header.model["revision"], "prompt_source": rc.prompt_source, "prompt_id": header.prompt.id,
        "seed": rc.seed, "prompt_index": rc.prompt_index, "sample_index": rc.sample_index,
        "temperature": gen.temperature, "top_p": gen.top_p,
        "top_k": gen.top_k, "max_new_tokens": rc.max_new_tokens, "do_sample": gen.do_sample,
        "prompt_text": header.prompt.text, "output_text": output_text,
        "answer": None if header.prompt.answer is None else list(header.prompt.answer), "grader": header.prompt.grader,
        "prompt_tokens": P, "num_layers": cap.hidden.shape[1], "elapsed_ms": cap.elapsed_ms,
        **{f"prompt_mean_{m}": v for m, v in zip(STEP_METRICS, means(steps[1:P]))},
        **(assessment or health.assess(cap)).columns(),
        "warnings": [f"{w.code}: {w.message}" for w in header.warnings],
    }
    return row


def traces_table(rows: list[dict]) -> pa.Table:
    """trace_row's rows as a `traces.parquet` table."""
    return pa.Table.from_pylist(rows, schema=TRACES_SCHEMA)
