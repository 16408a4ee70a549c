"""Parquet tables: the flattened form of the JSON traces.

`summaries.parquet` (`SCHEMA`): one row per (trace, step, layer), the contract's column list
plus `prompt_id`. `traces.parquet` (`TRACES_SCHEMA`): one row per trace, for analysis that
starts from whole generations. Both files' key-value metadata hold `schema_version` and the
job's resolved config as JSON (`corevital_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corevital import SCHEMA_VERSION
from corevital.capture import SequenceCapture
from corevital.files import atomic_write
from corevital.trace import Trace

F32 = pa.float32()
SCHEMA = pa.schema([
    ("trace_id", pa.string()), ("model", pa.string()), ("model_id", pa.string()),
    ("model_revision", pa.string()), ("prompt_source", pa.string()), ("seed", pa.int64()),
    ("prompt_index", pa.int32()), ("step_index", pa.int32()), ("layer_index", pa.int32()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()), ("max_new_tokens", pa.int32()),
    ("do_sample", pa.bool_()), ("is_prompt_token", pa.bool_()), ("token_id", pa.int64()), ("token_text", pa.string()),
    ("logits_entropy", F32), ("logits_top1_prob", F32), ("logits_top1_top2_margin", F32), ("token_logprob", F32),
    ("hidden_mean", F32), ("hidden_std", F32), ("hidden_l2_norm", F32), ("hidden_max_abs", F32),
    ("attn_entropy_mean", F32), ("attn_entropy_min", F32), ("attn_concentration_max", F32),
    ("hidden_sketch", pa.list_(F32)),
    ("prompt_id", pa.string()),
])
STEP_METRICS = ("logits_entropy", "logits_top1_prob", "logits_top1_top2_margin", "token_logprob")
TRACES_SCHEMA = pa.schema([
    ("trace_id", pa.string()), ("model", pa.string()), ("model_id", pa.string()), ("model_revision", pa.string()),
    ("prompt_source", pa.string()), ("prompt_id", pa.string()), ("seed", pa.int64()), ("prompt_index", pa.int32()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()), ("max_new_tokens", pa.int32()),
    ("do_sample", pa.bool_()), ("prompt_text", pa.string()), ("output_text", pa.string()),
    ("prompt_tokens", pa.int32()), ("generated_tokens", pa.int32()), ("num_layers", pa.int32()), ("elapsed_ms", pa.int64()),
    *((f"mean_{m}", F32) for m in STEP_METRICS),  # over the generated tokens' rows
    *((f"prompt_mean_{m}", F32) for m in STEP_METRICS),  # over prompt rows 1..P-1 (row 0 has no pass)
])
METADATA_CONFIG_KEY = "corevital_config"


def trace_table(trace: Trace, cap: SequenceCapture) -> pa.Table:
    """The (P + G) x L rows of one trace, step-major; row-0 metrics are null."""
    T, L = cap.hidden.shape[:2]
    n = T * L
    step = np.repeat(np.arange(T, dtype=np.int32), L)  # (n,)
    null = step == 0  # (n,) rows without a forward pass
    rc, gen = trace.run_config, trace.run_config.generation

    def const(value, typ):
        return pa.array(np.full(n, value), typ) if value is not None else pa.nulls(n, typ)

    def per_step(values):  # (T,) -> (n,), null on row 0
        return pa.array(np.repeat(values.astype(np.float32), L), F32, mask=null)

    def per_layer(values):  # (T, L) -> (n,), null on row 0
        return pa.array(values.reshape(n).astype(np.float32), F32, mask=null)

    texts = [s.token.token_text for s in trace.timeline]
    sketch_values = pa.array(cap.sketch.reshape(-1).astype(np.float32), F32)
    offsets = pa.array(np.arange(0, n * cap.sketch.shape[-1] + 1, cap.sketch.shape[-1], dtype=np.int32))
    columns = {
        "trace_id": pa.array([trace.trace_id] * n, pa.string()),
        "model": pa.array([trace.model.name] * n, pa.string()),
        "model_id": pa.array([trace.model.hf_id] * n, pa.string()),
        "model_revision": pa.array([trace.model.revision] * n, pa.string()),
        "prompt_source": pa.array([rc.prompt_source] * n, pa.string()),
        "seed": const(rc.seed, pa.int64()),
        "prompt_index": const(rc.prompt_index, pa.int32()),
        "step_index": pa.array(step, pa.int32()),
        "layer_index": pa.array(np.tile(np.arange(L, dtype=np.int32), T), pa.int32()),
        "temperature": const(gen.temperature, pa.float64()),
        "top_p": const(gen.top_p, pa.float64()),
        "top_k": const(gen.top_k, pa.int32()),
        "max_new_tokens": const(rc.max_new_tokens, pa.int32()),
        "do_sample": const(gen.do_sample, pa.bool_()),
        "is_prompt_token": pa.array(step < cap.prompt_len, pa.bool_()),
        "token_id": pa.array(np.repeat(cap.token_ids, L), pa.int64()),
        "token_text": pa.array(np.repeat(np.array(texts, dtype=object), L), pa.string()),
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
        "prompt_id": pa.array([trace.prompt.id] * n, pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def trace_row(trace: Trace, cap: SequenceCapture) -> pa.Table:
    """One trace as one row of `traces.parquet`; a mean over no rows (or only NaN) is null."""
    rc, gen, P = trace.run_config, trace.run_config.generation, cap.prompt_len
    steps = np.column_stack([cap.logit_stats, cap.token_logprob])  # (T, 4), in STEP_METRICS order

    def means(rows: np.ndarray) -> list[float | None]:
        finite = np.isfinite(rows)
        counts = finite.sum(0)
        sums = np.where(finite, rows, 0).astype(np.float64).sum(0)
        return [float(s / c) if c else None for s, c in zip(sums, counts)]

    row = {
        "trace_id": trace.trace_id, "model": trace.model.name, "model_id": trace.model.hf_id,
        "model_revision": trace.model.revision, "prompt_source": rc.prompt_source, "prompt_id": trace.prompt.id,
        "seed": rc.seed, "prompt_index": rc.prompt_index, "temperature": gen.temperature, "top_p": gen.top_p,
        "top_k": gen.top_k, "max_new_tokens": rc.max_new_tokens, "do_sample": gen.do_sample,
        "prompt_text": trace.prompt.text, "output_text": trace.generated.output_text, "prompt_tokens": P,
        "generated_tokens": cap.generated_len, "num_layers": cap.hidden.shape[1], "elapsed_ms": cap.elapsed_ms,
        **{f"mean_{m}": v for m, v in zip(STEP_METRICS, means(steps[P:]))},
        **{f"prompt_mean_{m}": v for m, v in zip(STEP_METRICS, means(steps[1:P]))},
    }
    return pa.Table.from_pylist([row], schema=TRACES_SCHEMA)


def write_parquet(tables: list[pa.Table], path: Path, config: dict[str, Any], schema: pa.Schema = SCHEMA) -> int:
    """Write one job's rows atomically (temporary name, then rename); returns the row count."""
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    meta = {b"schema_version": SCHEMA_VERSION.encode(), METADATA_CONFIG_KEY.encode(): json.dumps(config).encode()}
    table = table.replace_schema_metadata(meta)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return table.num_rows
