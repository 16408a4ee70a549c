"""What the fitted detectors, the layer probes and the failure horizon read: each trace's rows in
`summaries.parquet` turned back into its capture arrays, job by job, and from them

- the per-trace signals (assess/signals.py, the same declarations and functions the job used)
  recomputed from the first k generated rows only, for each k of HORIZONS (0: every row);
- per-layer features: each per-layer metric's mean over the first k generated rows, per layer
  (`<metric>@<layer>`), and with metrics.per_head each head's share of attention on the prompt
  (`head_prompt_mass@<layer>#<head>`, the Lookback Lens ratio, Chuang et al. 2024).

One job's file is read at a time, one row group after another, and each trace is reduced to a
few hundred numbers as soon as its rows are in: memory holds one row group and the features,
never a sweep's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corevital.assess import signals
from corevital.capture import SequenceCapture
from corevital.core import metrics

HORIZONS = (1, 2, 4, 8, 16, 0)  # the first k generated rows; 0: all of them
HEAD_FEATURE = "head_prompt_mass"  # per head, as Lookback Lens reads it
HEAD_COLUMNS = ("head_self_mass", HEAD_FEATURE)  # the per-head columns read: RAUQ's, and the feature
IDS = ("trace_id", "step_index", "layer_index", "is_prompt_token", "token_id")
_SIGNAL_NAMES = [s.name for s in signals.SIGNALS]


def layer_metrics(schema: pa.Schema) -> list[str]:
    """The per-layer scalar metrics a job's summaries.parquet holds (its lens columns only when on);
    not the sketch, whose random projections mean nothing one component at a time."""
    return [m.column for m in metrics.METRICS if m.per_layer and m.width is None and m.column in schema.names]


def step_metrics(schema: pa.Schema) -> list[str]:
    return [m.column for m in metrics.METRICS if not m.per_layer and m.column in schema.names]


@dataclass
class Features:
    """Per horizon k: `signals[k]` (trace_id + one column per signal) and `layers[k]` (trace_id +
    the per-layer features), one row per trace, in the order the traces were read; no key at all
    when no rows were read."""

    signals: dict[int, pd.DataFrame]
    layers: dict[int, pd.DataFrame]


def read(files: list[str], horizons=HORIZONS) -> Features:
    """Features of every trace in these summaries.parquet files (see the module docstring)."""
    sig: dict[int, list[pd.DataFrame]] = {k: [] for k in horizons}
    lay: dict[int, list[pd.DataFrame]] = {k: [] for k in horizons}
    for f in files:
        for batch in _batches(f):
            caps = list(_split(batch))
            ids = [tid for _, tid in caps]
            whole = [signals.compute(cap) for cap, _ in caps]
            for k in horizons:
                lay[k].append(pd.concat([pd.DataFrame({"trace_id": ids}), _layer_means(batch, k)], axis=1))
                rows = [  # a trace of at most k generated tokens is its whole self
                    signals.compute(truncate(cap, k)) if 0 < k < cap.generated_len else w
                    for (cap, _), w in zip(caps, whole)
                ]
                sig[k].append(pd.DataFrame({"trace_id": ids, **pd.DataFrame(rows, columns=_SIGNAL_NAMES)}))
    # no rows read (a run without summaries.parquet): no horizon at all
    return Features(
        {k: pd.concat(v, ignore_index=True) for k, v in sig.items() if v},
        {k: pd.concat(v, ignore_index=True) for k, v in lay.items() if v},
    )


@dataclass
class _Batch:
    """Whole traces' rows of one job, as numpy columns (rows step-major, layer-minor per trace)."""

    table: pa.Table
    per_row: list[str]
    per_layer: list[str]
    heads: list[str]
    _columns: dict = field(default_factory=dict)

    @cached_property
    def ids(self) -> np.ndarray:
        return self.table.column("trace_id").to_numpy(zero_copy_only=False)

    @cached_property
    def starts(self) -> np.ndarray:
        """(traces,) each trace's first row."""
        return np.flatnonzero(np.r_[True, self.ids[1:] != self.ids[:-1]])

    @cached_property
    def layers(self) -> int:
        return int(pc.max(self.table.column("layer_index")).as_py()) + 1

    def column(self, name: str) -> np.ndarray:
        """A metric column as numpy (float32; (rows, heads) for a per-head list), converted once."""
        if name not in self._columns:
            c = self.table.column(name)
            self._columns[name] = _lists(c) if name in self.heads else _floats(c)
        return self._columns[name]


def _layer_means(batch: "_Batch", k: int) -> pd.DataFrame:
    """The per-layer features of every trace of the batch at horizon k (module docstring): per
    layer, each metric's mean over the first k generated rows, by one bincount per column."""
    t, starts = batch.table, batch.starts
    lengths = np.diff(np.r_[starts, t.num_rows])
    n_traces, L = len(starts), batch.layers
    which = np.repeat(np.arange(n_traces), lengths)  # (rows,) each row's trace
    prompt = t.column("is_prompt_token").to_numpy(zero_copy_only=False)
    P = np.add.reduceat(prompt.astype(np.int64), starts) // L  # (traces,)
    gen = t.column("step_index").to_numpy() - P[which]  # (rows,) generated row number, < 0 on prompt rows
    rows = (gen >= 0) & ((gen < k) if k else True)
    key = which * L + t.column("layer_index").to_numpy()  # (rows,) (trace, layer)
    names, out = [], []
    for c in batch.per_layer:
        out.append(_segment_mean(batch.column(c), rows, key, n_traces * L).reshape(n_traces, L))
        names += [f"{c}@{layer}" for layer in range(L)]
    if HEAD_FEATURE in batch.heads:
        v = batch.column(HEAD_FEATURE)  # (rows, heads)
        per_head = [_segment_mean(v[:, h], rows, key, n_traces * L).reshape(n_traces, L) for h in range(v.shape[1])]
        out.append(np.stack(per_head, axis=-1).reshape(n_traces, -1))  # (traces, L x heads), layer-major
        names += [f"{HEAD_FEATURE}@{layer}#{h}" for layer in range(L) for h in range(v.shape[1])]
    return pd.DataFrame(np.concatenate(out, axis=1) if out else np.zeros((n_traces, 0)), columns=names)


def _segment_mean(v: np.ndarray, rows: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """Mean of v's finite values on `rows`, per key (0..n-1); NaN where a key has none."""
    on = rows & np.isfinite(v)
    total = np.bincount(key[on], weights=v[on].astype(np.float64), minlength=n)
    count = np.bincount(key[on], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _batches(path: str):
    """One summaries.parquet's rows as _Batches of whole traces, one row group at a time (a job
    writes each trace's rows contiguously)."""
    f = pq.ParquetFile(path)
    schema = f.schema_arrow
    per_layer, per_row = layer_metrics(schema), step_metrics(schema)
    heads = [c for c in HEAD_COLUMNS if c in schema.names]
    columns = [*IDS, *per_row, *per_layer, *heads]
    pending: pa.Table | None = None
    for g in range(f.num_row_groups):
        t = f.read_row_group(g, columns=columns)
        t = t if pending is None else pa.concat_tables([pending, t])
        ids = t.column("trace_id").to_numpy(zero_copy_only=False)
        last = np.flatnonzero(ids != ids[-1])
        cut = int(last[-1]) + 1 if len(last) else 0  # rows of the traces complete in this buffer
        if cut:
            yield _Batch(t.slice(0, cut), per_row, per_layer, heads)
        pending = t.slice(cut)
    if pending is not None and pending.num_rows:
        yield _Batch(pending, per_row, per_layer, heads)


def _split(batch: "_Batch"):
    """The traces of a batch, as captures."""
    t, ids, starts, L = batch.table, batch.ids, batch.starts, batch.layers
    ends = np.r_[starts[1:], len(ids)]
    cols = {c: batch.column(c) for c in [*batch.per_row, *batch.per_layer, *batch.heads]}
    token = t.column("token_id").to_numpy()
    prompt = t.column("is_prompt_token").to_numpy(zero_copy_only=False)
    for s, e in zip(starts, ends):
        T = (e - s) // L
        values = {c: cols[c][s:e:L] for c in batch.per_row}  # (T,): one value per row, on layer 0's
        values.update({c: cols[c][s:e].reshape(T, L) for c in batch.per_layer})
        values.update({c: cols[c][s:e].reshape(T, L, -1) for c in batch.heads})
        if "token_rank" in values:
            values["token_rank"] = np.nan_to_num(values["token_rank"], nan=-1).astype(np.int64)
        yield (
            SequenceCapture(
                prompt_len=int(prompt[s:e:L].sum()),
                token_ids=token[s:e:L].astype(np.int64),
                values=values,
                topk_ids=np.zeros((T, 5), np.int64),
                topk_probs=np.zeros((T, 5), np.float32),
                elapsed_ms=0,
            ),
            str(ids[s]),
        )


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A column as float32 numpy, null as NaN (booleans as 0/1)."""
    arr = column.combine_chunks()
    if pa.types.is_boolean(arr.type):
        arr = arr.cast(pa.float32())
    return arr.to_numpy(zero_copy_only=False).astype(np.float32)


def _lists(column: pa.ChunkedArray) -> np.ndarray:
    """A list column of one width per row -> (rows, width) float32, a null list as NaN."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(arr), max(width, 1)), np.nan, np.float32)
    full = (lengths == width) & arr.is_valid().to_numpy(zero_copy_only=False)
    if width:
        values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32)  # every list's values, in order
        starts = offsets[:-1][full]
        out[full] = values[starts[:, None] + np.arange(width)]
    return out


def truncate(cap: SequenceCapture, k: int) -> SequenceCapture:
    """The capture as if generation had stopped after k generated tokens (k = 0: unchanged)."""
    if k == 0 or cap.generated_len <= k:
        return cap
    T = cap.prompt_len + k
    return SequenceCapture(
        prompt_len=cap.prompt_len,
        token_ids=cap.token_ids[:T],
        values={c: v[:T] for c, v in cap.values.items()},
        topk_ids=cap.topk_ids[:T],
        topk_probs=cap.topk_probs[:T],
        elapsed_ms=0,
    )


def layer_of(feature: str) -> int | None:
    """The layer a feature name belongs to (`<metric>@<layer>` or `...@<layer>#<head>`), None for a signal."""
    if "@" not in feature:
        return None
    return int(feature.split("@", 1)[1].split("#", 1)[0])
