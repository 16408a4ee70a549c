"""Parquet tables: the flattened form of the JSON traces.

`summaries.parquet` (`SCHEMA`, or `schema(extras)` with user metrics): one row per (trace,
step, layer): the identity columns, then every metric declared in metrics.py, each column
built by one rule from its declaration (`metric_column`), then `prompt_id`. `traces.parquet`
(`TRACES_SCHEMA`): one row per trace, for analysis that starts from whole generations, with
the trace's signals (signals.py) and health flags (health.py) as columns, derived from their
declarations. Both files' key-value metadata hold `schema_version` and the
job's resolved config as JSON (`corevital_config`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from corevital.assess import health, signals
from corevital.core import metrics
from corevital.core.sequence import SequenceCapture
from corevital.output.tracedoc import TraceHeader
from corevital.output.vocab import Vocabulary

F32 = pa.float32()
IDENTITY = [
    ("trace_id", pa.string()),
    ("model", pa.string()),
    ("model_id", pa.string()),
    ("model_revision", pa.string()),
    ("prompt_source", pa.string()),
    ("seed", pa.int64()),
    ("prompt_index", pa.int32()),
    ("sample_index", pa.int32()),
    ("step_index", pa.int32()),
    ("layer_index", pa.int32()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("top_k", pa.int32()),
    ("max_new_tokens", pa.int32()),
    ("do_sample", pa.bool_()),
    ("is_prompt_token", pa.bool_()),
    ("token_id", pa.int64()),
    ("token_text", pa.string()),
]


def schema(extras=()) -> pa.Schema:
    """summaries.parquet's schema: the identity columns, every declared metric (metrics.py), then
    `prompt_id` (added in schema 1.1.0 after the metrics), then the user metrics' columns."""
    return pa.schema(
        [
            *IDENTITY,
            *metrics.arrow_fields(),
            ("prompt_id", pa.string()),
            *((m.column, m.type) for e in extras for m in e.metrics),
        ]
    )


SCHEMA = schema()
STEP_METRICS = metrics.V1_STEP_FLOATS  # traces.parquet's prompt means
TRACES_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),
        ("model", pa.string()),
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("prompt_source", pa.string()),
        ("prompt_id", pa.string()),
        ("seed", pa.int64()),
        ("prompt_index", pa.int32()),
        ("sample_index", pa.int32()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("top_k", pa.int32()),
        ("max_new_tokens", pa.int32()),
        ("do_sample", pa.bool_()),
        ("prompt_text", pa.string()),
        ("output_text", pa.string()),
        ("answer", pa.list_(pa.string())),
        ("grader", pa.string()),  # the .jsonl line's accepted answers and grader, if any
        ("prompt_tokens", pa.int32()),
        ("num_layers", pa.int32()),
        ("elapsed_ms", pa.int64()),
        *(
            (s.name, s.type) for s in signals.SIGNALS
        ),  # declared in signals.py (generated_tokens, mean_token_logprob, ...)
        *((f"prompt_mean_{m}", F32) for m in STEP_METRICS),  # over prompt rows 1..P-1 (row 0 has no pass)
        *((f.column, pa.bool_()) for f in health.FLAGS),  # declared in health.py
        ("warnings", pa.list_(pa.string())),  # "<code>: <message>" per warning of the trace
    ]
)
METADATA_CONFIG_KEY = "corevital_config"


# summaries.parquet's columns that hold one value per trace: each trace's traces.parquet row
# (same names, same types) repeated over its rows, by `summaries`.
PER_TRACE = [
    "trace_id",
    "model",
    "model_id",
    "model_revision",
    "prompt_source",
    "seed",
    "prompt_index",
    "sample_index",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "do_sample",
    "prompt_id",
]


def trace_table(caps: list[SequenceCapture], vocab: Vocabulary, table_schema: pa.Schema = SCHEMA) -> pa.Table:
    """The rows of a batch's traces, trace after trace, each trace's (P + G) x L rows
    step-major, with their own columns only (`summaries` adds the PER_TRACE ones); row-0
    metrics are null. Built column by column for the whole batch (one Arrow array per column,
    not one per trace). `table_schema`: the job's (schema(extras)), whose user-metric columns
    the captures hold."""
    L = caps[0].num_layers
    T = [len(c.token_ids) for c in caps]
    step = np.concatenate([np.arange(t, dtype=np.int32) for t in T]).repeat(L)  # (n,)
    token_ids = np.concatenate([c.token_ids for c in caps]).astype(np.int64).repeat(L)  # (n,)
    columns = {
        "step_index": pa.array(step, pa.int32()),
        "layer_index": pa.array(np.tile(np.arange(L, dtype=np.int32), sum(T)), pa.int32()),
        "is_prompt_token": pa.array(
            np.concatenate([np.arange(t) < c.prompt_len for t, c in zip(T, caps)]).repeat(L), pa.bool_()
        ),
        "token_id": pa.array(token_ids, pa.int64()),
        "token_text": vocab.arrow.take(pa.array(token_ids)),
    }
    null = step == 0  # (n,) rows without a forward pass
    for m in metrics.all_metrics(caps[0].extras):
        columns[m.column] = metric_column(m, [c.values.get(m.column) for c in caps], T, L, null)
    own = [f for f in table_schema if f.name not in PER_TRACE]
    return pa.Table.from_arrays([columns[f.name] for f in own], schema=pa.schema(own))


def summaries(rows: pa.Table, traces: pa.Table, table_schema: pa.Schema = SCHEMA) -> pa.Table:
    """A batch's summaries.parquet rows: `rows` (its traces' `trace_table`s, in order) with the
    PER_TRACE columns of `traces` (their traces.parquet rows) repeated over each trace's rows."""
    first = np.flatnonzero((rows["step_index"].to_numpy() == 0) & (rows["layer_index"].to_numpy() == 0))  # (traces,)
    if len(first) != traces.num_rows:
        raise ValueError(f"{traces.num_rows} traces for {len(first)} traces' rows")
    which = np.repeat(np.arange(len(first)), np.diff(first, append=rows.num_rows))  # (n,) each row's trace
    per_trace = traces.select(PER_TRACE).take(pa.array(which))
    return pa.Table.from_arrays(
        [(per_trace if f.name in PER_TRACE else rows)[f.name] for f in table_schema], schema=table_schema
    )


def metric_column(
    m: metrics.Metric, values: list[np.ndarray | None], T: list[int], L: int, null: np.ndarray
) -> pa.Array:
    """One declared metric's rows over a batch's traces (values[i]: trace i's (T_i, ...) array;
    all None where it was not captured, e.g. the logit lens off): a per-row value repeated on
    each layer's row, null on row 0 and where the declaration says a NaN is null; all null
    when not captured."""
    n = len(null)
    if all(v is None for v in values):
        return pa.nulls(n, m.type)
    if any(v is None for v in values):  # one generate call captures the same metrics for every sequence
        raise ValueError(f"{m.column} was captured for some traces of a batch and not for others")
    flat = np.concatenate(
        [
            v.reshape(t * L, m.width) if m.width else v.reshape(t * L) if m.per_layer else np.repeat(v, L)
            for t, v in zip(T, values)
        ]
    )  # (n,) or (n, width)
    if (
        m.width is not None
    ):  # a list column; one whose every value is undefined (NaN) is null where the declaration says
        offsets = pa.array(np.arange(0, n * m.width + 1, m.width, dtype=np.int32))
        missing = null | np.isnan(flat).all(-1) if m.nan_is_null else null
        return pa.ListArray.from_arrays(
            offsets, pa.array(flat.reshape(-1).astype(np.float32), F32), type=m.type, mask=pa.array(missing)
        )
    if m.type == metrics.I32:
        return pa.array(flat.astype(np.int32), m.type, mask=null)
    missing = null | np.isnan(flat) if m.nan_is_null or m.type == metrics.BOOL else null
    if m.type == metrics.BOOL:
        return pa.array(flat > 0.5, m.type, mask=missing)
    return pa.array(flat.astype(np.float32), m.type, mask=missing)


def trace_row(
    cap: SequenceCapture, header: TraceHeader, output_text: str, assessment: health.Assessment | None = None
) -> dict:
    """One trace as one row of `traces.parquet` (see traces_table); a mean over no rows (or only NaN) is null.
    `assessment`: the trace's signals and flags (computed here, with the default thresholds, when None)."""
    rc, gen, P = header.run_config, header.run_config.generation, cap.prompt_len
    steps = np.column_stack([cap[m] for m in STEP_METRICS])  # (T, 4)

    def means(rows: np.ndarray) -> list[float | None]:
        finite = np.isfinite(rows)
        counts = finite.sum(0)
        sums = np.where(finite, rows, 0).astype(np.float64).sum(0)
        return [float(s / c) if c else None for s, c in zip(sums, counts)]

    row = {
        "trace_id": header.trace_id,
        "model": header.model["name"],
        "model_id": header.model["hf_id"],
        "model_revision": header.model["revision"],
        "prompt_source": rc.prompt_source,
        "prompt_id": header.prompt.id,
        "seed": rc.seed,
        "prompt_index": rc.prompt_index,
        "sample_index": rc.sample_index,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "top_k": gen.top_k,
        "max_new_tokens": rc.max_new_tokens,
        "do_sample": gen.do_sample,
        "prompt_text": header.prompt.text,
        "output_text": output_text,
        "answer": None if header.prompt.answer is None else list(header.prompt.answer),
        "grader": header.prompt.grader,
        "prompt_tokens": P,
        "num_layers": cap.num_layers,
        "elapsed_ms": cap.elapsed_ms,
        **{f"prompt_mean_{m}": v for m, v in zip(STEP_METRICS, means(steps[1:P]))},
        **(assessment or health.assess(cap)).columns(),
        "warnings": [f"{w.code}: {w.message}" for w in header.warnings],
    }
    return row


def traces_table(rows: list[dict]) -> pa.Table:
    """trace_row's rows as a `traces.parquet` table."""
    return pa.Table.from_pylist(rows, schema=TRACES_SCHEMA)
