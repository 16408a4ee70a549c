"""What the fitted detectors, the layer probes and the failure horizon read: each trace's rows in
`summaries.parquet` turned back into its capture arrays, job by job, and from them

- the per-trace signals (assess/signals.py, the same declarations and functions the job used)
  recomputed from the first k generated rows only, for each k of HORIZONS (0: every row);
- per-layer features: each per-layer metric's mean over the first k generated rows, per layer
  (`<metric>@<layer>`), and with metrics.per_head each head's share of attention on the prompt
  (`head_prompt_mass@<layer>#<head>`, the Lookback Lens ratio, Chuang et al. 2024).

The files are read in chunks of whole row groups, one after another, and each trace is reduced
to a few hundred numbers as soon as its rows are in: a reader holds one row group and the
features, never a sweep's rows. The chunks are shared out over worker processes (parallel.py),
one per core; a trace belongs to the chunk its first row is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corevital.analysis import parallel
from corevital.assess import signals
from corevital.core import metrics
from corevital.core.sequence import SequenceCapture

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


def read(files: list[str], horizons=HORIZONS, workers: int | None = None, chunk_rows: int | None = None) -> Features:
    """Features of every trace in these summaries.parquet files (see the module docstring), in
    the files' order. `workers`: processes (None: one per core, for two chunks' worth of rows
    or more); `chunk_rows`: rows per chunk (None: enough chunks for every worker to get several)."""
    sizes = [[m.num_rows for m in _row_groups(f)] for f in files]
    total = sum(map(sum, sizes))
    if workers is None:
        workers = parallel.workers() if total >= 2 * MIN_CHUNK_ROWS else 1
    if chunk_rows is None:
        chunk_rows = max(MIN_CHUNK_ROWS, total // (4 * workers))
    tasks = [(f, groups, tuple(horizons)) for f, s in zip(files, sizes) for groups in _chunks(s, chunk_rows)]
    parts = parallel.run(_read_chunk, tasks, workers)
    # no rows read (a run without summaries.parquet): no horizon at all
    return Features(
        {k: pd.concat(v, ignore_index=True) for k in horizons if (v := [p.signals[k] for p in parts if p])},
        {k: pd.concat(v, ignore_index=True) for k in horizons if (v := [p.layers[k] for p in parts if p])},
    )


MIN_CHUNK_ROWS = 200_000  # below this, a worker's start costs more than it saves


def _row_groups(path: str) -> list:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(g) for g in range(meta.num_row_groups)]


def _chunks(sizes: list[int], rows: int) -> list[range]:
    """Consecutive row groups of at least `rows` rows each (the last one may be smaller)."""
    out, start, total = [], 0, 0
    for g, n in enumerate(sizes):
        total += n
        if total >= rows:
            out.append(range(start, g + 1))
            start, total = g + 1, 0
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def _read_chunk(path: str, groups: range, horizons: tuple[int, ...]) -> Features | None:
    """The features of the traces whose first row is in these row groups of one file."""
    ids: list[str] = []
    sig: dict[int, list] = {k: [] for k in horizons}
    lay: dict[int, list] = {k: [] for k in horizons}
    names: list[str] = []
    for batch in _batches(path, groups):
        caps = list(_split(batch))
        ids += [tid for _, tid in caps]
        for cap, _ in caps:
            whole = list(signals.compute(cap).values())
            for k in horizons:  # a trace of at most k generated tokens is its whole self
                sig[k].append(list(signals.compute(truncate(cap, k)).values()) if 0 < k < cap.generated_len else whole)
        names, means = _layer_means(batch, horizons)
        for k in horizons:
            lay[k].append(means[k])
    if not ids:
        return None
    index = {"trace_id": ids}
    return Features(
        {k: pd.concat([pd.DataFrame(index), pd.DataFrame(sig[k], columns=_SIGNAL_NAMES)], axis=1) for k in horizons},
        {
            k: pd.concat([pd.DataFrame(index), pd.DataFrame(np.concatenate(lay[k]), columns=names)], axis=1)
            for k in horizons
        },
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


def _layer_means(batch: "_Batch", horizons: tuple[int, ...]) -> tuple[list[str], dict[int, np.ndarray]]:
    """The per-layer features of every trace of the batch (module docstring): their names, and
    per horizon k a (traces, features) array of each metric's mean over the first k generated
    rows, per layer. One bincount per column serves every horizon: rows are summed per (trace,
    layer, span between two horizons), and a horizon's sums are the spans below it added up."""
    t, starts = batch.table, batch.starts
    lengths = np.diff(np.r_[starts, t.num_rows])
    n_traces, L = len(starts), batch.layers
    which = np.repeat(np.arange(n_traces), lengths)  # (rows,) each row's trace
    prompt = t.column("is_prompt_token").to_numpy(zero_copy_only=False)
    P = np.add.reduceat(prompt.astype(np.int64), starts) // L  # (traces,)
    gen = t.column("step_index").to_numpy() - P[which]  # (rows,) generated row number, < 0 on prompt rows
    ks = sorted(k for k in horizons if k)
    span = np.searchsorted(ks, gen, side="right")  # (rows,) the spans: gen < ks[0], < ks[1], ..., the rest
    S = len(ks) + 1
    key = (which * L + t.column("layer_index").to_numpy()) * S + span  # (rows,) (trace, layer, span)
    rows, n = gen >= 0, n_traces * L * S
    names, sums = [], []  # (2, traces, features, S): sums and counts per span
    for c in batch.per_layer:
        sums.append(_span_sums(batch.column(c)[:, None], rows, key, n).reshape(2, n_traces, L, S))
        names += [f"{c}@{layer}" for layer in range(L)]
    if HEAD_FEATURE in batch.heads:
        v = batch.column(HEAD_FEATURE)  # (rows, heads)
        per_head = _span_sums(v, rows, key, n).reshape(2, n_traces, L, S, v.shape[1]).transpose(0, 1, 2, 4, 3)
        sums.append(per_head.reshape(2, n_traces, -1, S))  # layer-major, head-minor
        names += [f"{HEAD_FEATURE}@{layer}#{h}" for layer in range(L) for h in range(v.shape[1])]
    if not sums:
        return names, {k: np.zeros((n_traces, 0)) for k in horizons}
    total = np.concatenate(sums, axis=2).cumsum(-1)  # (2, traces, features, S)
    out = {}
    for k in horizons:
        at = total[..., ks.index(k) if k else S - 1]  # (2, traces, F): sums and counts of the rows below k
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(at[1] > 0, at[0] / at[1], np.nan)
    return names, out


def _span_sums(v: np.ndarray, rows: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """(2, n, heads): the sum and the count of v's finite values (v: (rows, heads)) on `rows`,
    per key (0..n-1) and column; float64."""
    H = v.shape[1]
    on = rows[:, None] & np.isfinite(v)  # (rows, heads)
    k = (key[:, None] * H + np.arange(H))[on]  # (kept,) (key, head)
    total = np.bincount(k, weights=v[on].astype(np.float64), minlength=n * H).reshape(n, H)
    count = np.bincount(k, minlength=n * H).reshape(n, H).astype(np.float64)
    return np.stack([total, count])


def _batches(path: str, groups: range | None = None):
    """The rows of the traces that begin in these row groups of one summaries.parquet (all of
    them: None) as _Batches of whole traces, one row group at a time (a job writes each trace's
    rows contiguously). A trace begun in the group before `groups` is left to the chunk that
    holds that group; one still going at the end is read on into the groups after."""
    f = pq.ParquetFile(path)
    schema = f.schema_arrow
    per_layer, per_row = layer_metrics(schema), step_metrics(schema)
    heads = [c for c in HEAD_COLUMNS if c in schema.names]
    columns = [*IDS, *per_row, *per_layer, *heads]
    groups = range(f.num_row_groups) if groups is None else groups
    skip = _last_id(f, groups.start - 1) if groups.start else None  # the trace begun before the chunk
    pending: pa.Table | None = None  # the last trace read, perhaps not complete
    for g in range(groups.start, f.num_row_groups):
        past = g >= groups.stop
        if past and pending is None:
            break
        t = f.read_row_group(g, columns=columns)
        if skip is not None:
            lead = _leading(t, skip)
            if lead == t.num_rows:
                continue
            t, skip = t.slice(lead), None
        if past:  # only the rest of the chunk's last trace
            lead = _leading(t, pending.column("trace_id")[-1].as_py())
            pending = pa.concat_tables([pending, t.slice(0, lead)])
            if lead < t.num_rows:
                break
            continue
        t = t if pending is None else pa.concat_tables([pending, t])
        ids = t.column("trace_id").to_numpy(zero_copy_only=False)
        last = np.flatnonzero(ids != ids[-1])
        cut = int(last[-1]) + 1 if len(last) else 0  # rows of the traces complete in this buffer
        if cut:
            yield _Batch(t.slice(0, cut), per_row, per_layer, heads)
        pending = t.slice(cut)
    if pending is not None and pending.num_rows:
        yield _Batch(pending, per_row, per_layer, heads)


def _last_id(f: pq.ParquetFile, group: int) -> str:
    return f.read_row_group(group, columns=["trace_id"]).column(0)[-1].as_py()


def _leading(t: pa.Table, trace_id: str) -> int:
    """How many of t's first rows belong to trace `trace_id`."""
    other = np.flatnonzero(t.column("trace_id").to_numpy(zero_copy_only=False) != trace_id)
    return int(other[0]) if len(other) else t.num_rows


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
    full = (lengths == width) & arr.is_valid().to_numpy(zero_copy_only=False)
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)  # every list's values
    out = np.full((len(arr), max(width, 1)), np.nan, np.float32)
    if width and not lengths[~full].any():  # the other rows empty (null): the full ones' values back to back
        out[full] = values[offsets[0] : offsets[0] + int(full.sum()) * width].reshape(-1, width)
    elif width:
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
