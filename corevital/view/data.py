"""What the viewer reads: the job and sweep dirs it was given, queried lazily with DuckDB.

Nothing here holds the sweep: each request runs one SQL query over the jobs' Parquet files,
which DuckDB reads column by column (projection) and row group by row group (a trace's rows
are found by `prompt_index` and `sample_index`, which a job writes in order, so the row groups'
statistics rule out all but the one or two that hold them). What stays in memory is the list
of job dirs and DuckDB's buffer pool, capped by MEMORY_LIMIT. Every value the pages show comes
from `traces.parquet`, `summaries.parquet`, `evaluation/labels.parquet` or the trace's JSON
(top-k tokens and the health flags' steps), as docs/view.md lists.
"""

from __future__ import annotations

import functools
import gzip
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson

from corevital.assess import health, signals
from corevital.core import metrics
from corevital.core.files import outputs_under
from corevital.output.table import SCHEMA
from corevital.output.writer import TRACES_DIR

MEMORY_LIMIT = "512MB"  # DuckDB's buffer pool; the server's whole footprint stays under 1 GB
SHORT = 240  # characters of prompt and output text the sweep list carries per trace
PAGE_MAX = 1000  # traces per list request, at most
SIGNAL_COLUMNS = tuple(s.name for s in signals.SIGNALS)
FLAG_COLUMNS = tuple(f.column for f in health.FLAGS)
LIST_COLUMNS = ("model", "seed", "prompt_index", "sample_index", "prompt", "output", *SIGNAL_COLUMNS, "correct")
ROW_METRICS = tuple(m.column for m in metrics.METRICS if m.group == metrics.STEP_GROUP) + ("token_rank",)
_VECTORS = {m.column for m in metrics.METRICS if m.width is not None}  # the sketch: not a number per cell
_FIXED = {f.name for f in SCHEMA} - set(ROW_METRICS) - {m.column for m in metrics.METRICS}  # ids, config, token


class NotFound(LookupError):
    """A trace id (or a step) that the given dirs do not hold."""


@dataclass(frozen=True)
class Job:
    dir: Path
    traces: Path  # traces.parquet
    summaries: Path | None  # summaries.parquet (absent: the trace page shows the header only)


def find_jobs(paths: list[Path]) -> list[Job]:
    """Every finished job under the given job or sweep dirs (a dir holding traces.parquet), sorted."""
    found: dict[Path, Job] = {}
    for root in paths:
        for t in sorted(
            [root / "traces.parquet"] if (root / "traces.parquet").is_file() else outputs_under(root, "traces.parquet")
        ):
            job = t.parent.resolve()
            s = job / "summaries.parquet"
            found[job] = Job(job, t.resolve(), s if s.is_file() else None)
    return sorted(found.values(), key=lambda j: str(j.dir))


class Sweep:
    """The traces of the given dirs, as SQL views over their Parquet files (one DuckDB connection,
    one query at a time: the server's threads take turns)."""

    def __init__(self, paths: list[Path]):
        self.roots = [p.resolve() for p in paths]
        self.jobs = find_jobs(self.roots)
        if not self.jobs:
            raise FileNotFoundError(f"no traces.parquet under {', '.join(map(str, paths))}")
        self._lock = threading.Lock()
        self.db = duckdb.connect(config={"threads": 2, "memory_limit": MEMORY_LIMIT})
        files = [str(j.traces) for j in self.jobs]
        self.db.execute("CREATE TABLE jobs (job INTEGER, file VARCHAR)")
        self.db.executemany("INSERT INTO jobs VALUES (?, ?)", [(i, f) for i, f in enumerate(files)])
        labels = sorted({str(p.resolve()) for r in self.roots for p in _labels_files(r)})
        self.has_labels = bool(labels)
        # file lists enter through DuckDB's Python API, never spliced into SQL text
        self.db.read_parquet(files, filename=True, union_by_name=True).create_view("raw_traces")
        if labels:
            self.db.read_parquet(labels, union_by_name=True).create_view("raw_labels")
            correct = "(SELECT trace_id, bool_or(correct) AS correct FROM raw_labels GROUP BY trace_id)"
        else:
            correct = "(SELECT NULL::VARCHAR AS trace_id, NULL::BOOLEAN AS correct WHERE false)"
        self.db.execute(
            f"""CREATE VIEW traces AS
            SELECT t.* EXCLUDE (filename), j.job, l.correct
            FROM raw_traces t JOIN jobs j ON j.file = t.filename
            LEFT JOIN {correct} l USING (trace_id)"""
        )
        self.count = self._one("SELECT count(*) FROM traces")[0]

    # --- queries ------------------------------------------------------------------------
    def _all(self, sql: str, params=None) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params or []).fetchall()

    def _one(self, sql: str, params=None) -> tuple:
        rows = self._all(sql, params)
        return rows[0] if rows else ()

    def meta(self) -> dict[str, Any]:
        """What the sweep page's filters offer."""
        models = [r[0] for r in self._all("SELECT DISTINCT model FROM traces ORDER BY 1")]
        seeds = [r[0] for r in self._all("SELECT DISTINCT seed FROM traces ORDER BY 1")]
        return {
            "count": self.count,
            "models": models,
            "seeds": seeds,
            "signals": list(SIGNAL_COLUMNS),
            "flags": [c.removeprefix("flag_") for c in FLAG_COLUMNS],
            "columns": list(LIST_COLUMNS),
            "has_labels": self.has_labels,
            "evaluation": self.has_labels and bool(self._signals_files()),
        }

    def list(self, params: dict[str, str]) -> dict[str, Any]:
        """One window of the sweep list under the filters and sort of `params` (the sweep page's
        query string): total (traces under the filters) and rows[offset : offset + limit]."""
        where, args = _where(params)
        sort = params.get("sort") or "prompt_index"
        if sort not in LIST_COLUMNS and sort != "flags":
            sort = "prompt_index"
        key = {"prompt": "prompt_text", "output": "output_text", "flags": "flag_count"}.get(sort, sort)
        order = "DESC" if params.get("desc") in ("1", "true") else "ASC"
        offset = max(0, _int(params.get("offset"), 0))
        limit = min(PAGE_MAX, max(1, _int(params.get("limit"), 200)))
        flags = " + ".join(f'coalesce("{c}"::INT, 0)' for c in FLAG_COLUMNS)
        total = self._one(f"SELECT count(*) FROM traces WHERE {where}", args)[0]
        cols = ", ".join(f'"{c}"' for c in SIGNAL_COLUMNS + FLAG_COLUMNS)
        rows = self._all(
            f"""SELECT trace_id, model, seed, prompt_index, sample_index, left(prompt_text, {SHORT}),
                left(output_text, {SHORT}), {cols}, correct, job
            FROM (SELECT *, {flags} AS flag_count FROM traces WHERE {where})
            ORDER BY "{key}" {order} NULLS LAST, job, prompt_index, sample_index
            LIMIT {limit} OFFSET {offset}""",
            args,
        )
        names = ["trace_id", "model", "seed", "prompt_index", "sample_index", "prompt", "output"]
        names += [*SIGNAL_COLUMNS, *FLAG_COLUMNS, "correct", "job"]
        out = []
        for r in rows:
            d = dict(zip(names, r))
            d["flags"] = [c.removeprefix("flag_") for c in FLAG_COLUMNS if d.pop(c)]
            d["job"] = self.job_name(d["job"])
            out.append(_finite(d))
        return {"total": total, "offset": offset, "rows": out}

    def job_name(self, job: int) -> str:
        """A job's dir as the user gave it: relative to the root it was found under."""
        d = self.jobs[job].dir
        for r in self.roots:
            if d == r or r in d.parents:
                return str(Path(r.name) / d.relative_to(r))
        return d.name

    def header(self, trace_id: str) -> dict[str, Any]:
        """The trace's traces.parquet row (all of it), its job, and whether evaluate graded it."""
        with self._lock:
            cur = self.db.execute("SELECT * FROM traces WHERE trace_id = ?", [trace_id])
            row, names = cur.fetchone(), [d[0] for d in cur.description]
        if row is None:
            raise NotFound(trace_id)
        d = _finite(dict(zip(names, row)))
        d["job_dir"] = self.job_name(d["job"])
        return d

    def trace(self, trace_id: str) -> dict[str, Any]:
        """Everything the trace page shows: the header, every row's per-row values, every
        (row, layer) value (step-major), the top-k tokens and the health flags' steps."""
        head = self.header(trace_id)
        job = self.jobs[head["job"]]
        doc = _trace_json(job.dir, head["prompt_index"], head["sample_index"], trace_id)
        out: dict[str, Any] = {"trace": head, "rows": None, "layers": None, "topk": None, "health": None}
        if doc is not None:
            out["topk"], out["health"] = doc["timeline_topk"], doc["health"]
        if job.summaries is None:
            return out
        with self._lock:
            names = [
                r[0] for r in self.db.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(job.summaries)]).fetchall()
            ]
            per_layer = [n for n in names if n not in _FIXED and n not in ROW_METRICS and n not in _VECTORS]
            wanted = ["step_index", "layer_index", "token_id", "token_text", "is_prompt_token", *ROW_METRICS]
            wanted += per_layer
            cols = ", ".join(f'"{c}"' for c in wanted if c in names)
            table = self.db.execute(
                f"""SELECT {cols} FROM read_parquet(?) WHERE prompt_index = ? AND sample_index = ?
                AND trace_id = ? ORDER BY step_index, layer_index""",
                [str(job.summaries), head["prompt_index"], head["sample_index"], trace_id],
            ).fetchnumpy()
        L = int(table["layer_index"].max()) + 1 if len(table["layer_index"]) else 0
        first = slice(None, None, max(L, 1))  # each row's layer-0 entry
        out["rows"] = {
            c: _column(table[c][first])
            for c in ("step_index", "token_id", "token_text", "is_prompt_token", *ROW_METRICS)
        }
        out["layers"] = {"count": L, "metrics": {c: _column(table[c]) for c in per_layer if c in table}}
        return out

    def siblings(self, trace_id: str) -> list[dict[str, Any]]:
        """Other traces of the same prompt (same source and index): other seeds, samples, models."""
        head = self.header(trace_id)
        rows = self._all(
            """SELECT trace_id, model, seed, sample_index, left(output_text, 120) FROM traces
            WHERE prompt_source IS NOT DISTINCT FROM ? AND prompt_index = ? AND trace_id <> ?
            ORDER BY model, seed, sample_index LIMIT 200""",
            [head["prompt_source"], head["prompt_index"], trace_id],
        )
        return [dict(zip(("trace_id", "model", "seed", "sample_index", "output"), r)) for r in rows]

    def evaluation(self) -> dict[str, Any] | None:
        """The evaluation's signal table (signals.parquet, as evaluate wrote it) and the ROC curves
        evaluate's figure draws for the pooled rows (evaluation.roc_shown), computed from the labels
        and the traces' values."""
        import pandas as pd

        from corevital.analysis import evaluation, scoring

        files = self._signals_files()
        if not files or not self.has_labels:
            return None
        ranking = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        pooled = ranking[ranking.model == evaluation.POOLED]
        with self._lock:
            present = set(self.db.execute("SELECT * FROM traces LIMIT 0").df().columns)
        shown = [s for s in evaluation.roc_shown(pooled) if s in present]  # answer_agreement: evaluate's, not the jobs'
        cols = ", ".join(f'"{c}"' for c in shown)
        with self._lock:
            data = self.db.execute(f"SELECT correct, {cols} FROM traces WHERE correct IS NOT NULL").df()
        wrong = ~data.correct.to_numpy(dtype=bool)
        baselines, curves = set(evaluation.baselines()), []
        for name in shown:
            direction = pooled[pooled.signal == name].direction.iloc[0]
            values = pd.to_numeric(data[name], errors="coerce").to_numpy(dtype=np.float64)  # null: NaN
            fpr, tpr = scoring.roc_curve(wrong, direction * values)
            curves.append({"signal": name, "baseline": name in baselines, "fpr": _column(fpr), "tpr": _column(tpr)})
        return {"table": [_finite(r) for r in ranking.to_dict("records")], "curves": curves, **self._fitted(files)}

    def _fitted(self, signal_files: list[str]) -> dict[str, Any]:
        """evaluate's fitted results beside each signals.parquet, where it wrote them: the detectors'
        table, AUROC by layer (per model) and AUROC by k (pooled) for the detectors and the signals
        report.html draws (report_fitted.horizon_shown)."""
        import pandas as pd

        from corevital.analysis import evaluation, features, report_fitted

        def rows(name: str) -> pd.DataFrame:
            found = [Path(f).with_name(name) for f in signal_files if Path(f).with_name(name).is_file()]
            return pd.concat([pd.read_parquet(f) for f in found], ignore_index=True) if found else pd.DataFrame()

        detectors, layers, early = rows("detectors.parquet"), rows("layers.parquet"), rows("early.parquet")
        out: dict[str, Any] = {
            "detectors": [_finite(r) for r in detectors.to_dict("records")],
            "horizons": list(features.HORIZONS),  # the horizon plot's k, in order (0: the whole answer)
        }
        out["layers"] = (
            [_finite(r) for r in layers.sort_values(["model", "layer_index"]).to_dict("records")] if len(layers) else []
        )
        if len(early):
            shown = report_fitted.horizon_shown(early, evaluation.baselines())
            pooled = early[(early.model == evaluation.POOLED) & early.signal.isin(shown)]
            out["early"] = [_finite(r) for r in pooled.to_dict("records")]
        else:
            out["early"] = []
        return out

    def _signals_files(self) -> list[str]:
        return sorted({str(p.resolve()) for r in self.roots for p in _labels_files(r, "signals.parquet")})

    def close(self) -> None:
        self.db.close()


def _labels_files(root: Path, name: str = "labels.parquet") -> list[Path]:
    """evaluate's outputs for the dirs under `root` (DIR/evaluation/NAME), and for the dirs above
    it up to two levels (a job dir of an evaluated sweep)."""
    found = outputs_under(root, f"evaluation/{name}")
    found += [p / "evaluation" / name for p in list(root.parents)[:2] if (p / "evaluation" / name).is_file()]
    return found


def _where(params: dict[str, str]) -> tuple[str, list]:
    """The sweep list's filters as a SQL condition with its parameters (never text spliced in)."""
    clauses, args = ["true"], []
    q = (params.get("q") or "").strip().lower()
    if q:
        clauses.append("(contains(lower(prompt_text), ?) OR contains(lower(output_text), ?))")
        args += [q, q]
    if params.get("model"):
        clauses.append("model = ?")
        args.append(params["model"])
    if params.get("seed") not in (None, ""):
        clauses.append("seed = ?")
        args.append(_int(params["seed"], -1))
    correct = params.get("correct")
    if correct in ("correct", "wrong"):
        clauses.append("correct = ?")
        args.append(correct == "correct")
    elif correct == "ungraded":
        clauses.append("correct IS NULL")
    flag = params.get("flag")
    if flag and f"flag_{flag}" in FLAG_COLUMNS:
        clauses.append(f'"flag_{flag}"')
    elif flag == "any":
        clauses.append("(" + " OR ".join(f'coalesce("{c}", false)' for c in FLAG_COLUMNS) + ")")
    return " AND ".join(clauses), args


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _finite(d: dict) -> dict:
    """NaN and Inf as None, numpy scalars as Python values (JSON null where there is no number)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not np.isfinite(v):
            v = None
        out[k] = v
    return out


def _column(a: np.ndarray):
    """A column ready for orjson (OPT_SERIALIZE_NUMPY): floats as a float32 array, written as
    their shortest text, NaN, Inf and masked (null) entries as null; other types as lists."""
    mask = np.ma.getmaskarray(a) if np.ma.isMaskedArray(a) else None
    a = np.ma.getdata(a)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
        if mask is not None and mask.any():
            a = np.where(mask, np.float32(np.nan), a)
        return np.ascontiguousarray(a)
    out = a.tolist() if a.dtype.kind in "iub" else [None if x is None else str(x) for x in a.tolist()]
    if mask is not None and mask.any():
        out = [None if m else x for x, m in zip(out, mask)]
    return out


# A step's top-k list and the document's tail, found in the bytes tracedoc writes (docs/format.md):
# inside JSON strings quotes are escaped, so these raw patterns only match the document's own keys.
_TOPK = re.compile(rb'"logits_summary":(null|\{[^{]*?"topk":(\[.*?\])\}),"layers"', re.S)
_TRACE_ID = re.compile(rb'"trace_id":\s*("(?:[^"\\]|\\.)*")')


@functools.lru_cache(maxsize=8)
def _trace_json(job_dir: Path, prompt_index: int, sample_index: int, trace_id: str) -> dict | None:
    """The trace's top-k lists (one per step, None for row 0) and health flags, from its JSON
    (`traces.format` json or json.gz); None where the job wrote none. The few last read are kept
    (a trace page and its token clicks read one)."""
    folder = job_dir / TRACES_DIR
    for name in (f"prompt_{prompt_index:05d}_sample_{sample_index:03d}", f"prompt_{prompt_index:05d}"):
        for ext in (".json", ".json.gz"):
            path = folder / (name + ext)
            if path.is_file():
                raw = path.read_bytes()
                found = _topk_and_health(gzip.decompress(raw) if ext == ".json.gz" else raw, trace_id)
                if found is not None:
                    return found
    return None


def _topk_and_health(raw: bytes, trace_id: str) -> dict | None:
    """{"timeline_topk": [...], "health": {...}} of a trace document, read without parsing its
    timeline (a 1,000-token, 32-layer trace: 25 ms against 370 ms for the whole document); a
    document laid out otherwise is parsed whole. None if it is another trace's."""
    m = _TRACE_ID.search(raw, 0, 400)
    if m is None or orjson.loads(m[1]) != trace_id:
        return None
    tail = raw.rfind(b',"summary":')
    steps = [x[2] or b"null" for x in _TOPK.finditer(raw)]
    try:
        topk = orjson.loads(b"[" + b",".join(steps) + b"]")
        health = orjson.loads(b"{" + raw[tail + 1 :])["health"]
        if len(topk) == orjson.loads(raw[tail + 1 :].split(b'"total_steps":', 1)[1].split(b",", 1)[0]):
            return {"timeline_topk": topk, "health": health}
    except (orjson.JSONDecodeError, IndexError, KeyError):
        pass
    doc = orjson.loads(raw)
    steps = [None if s["logits_summary"] is None else s["logits_summary"]["topk"] for s in doc["timeline"]]
    return {"timeline_topk": steps, "health": doc["health"]}
