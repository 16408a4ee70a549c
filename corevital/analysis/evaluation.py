"""`corevital evaluate DIR`: grade every trace under a run or sweep dir, then measure how well
each per-trace signal and health flag predicts a wrong answer (docs/evaluate.md).

    corevital evaluate DIR [--resamples 1000]

writes, all at once (a temporary folder renamed into place, so never half of it):

    DIR/evaluation/labels.parquet       trace_id, model, correct, graded
    DIR/evaluation/signals.parquet      signal, model, direction, n, n_wrong, auroc, auroc_low, auroc_high, prr
    DIR/evaluation/detectors.parquet    detector, model, n, n_wrong, auroc, auroc_low, auroc_high, prr
    DIR/evaluation/predictions.parquet  trace_id, question, fold, detector, score (out of fold)
    DIR/evaluation/layers.parquet       model, layer_index, auroc, auroc_low, auroc_high (layer blame)
    DIR/evaluation/early.parquet        signal, model, k, auroc (the first k generated rows only)
    DIR/evaluation/report.html          ROC curves, the ranked tables, AUROC by layer and by k

and prints the ranked table. Answers come from `traces.parquet`'s `answer` and `grader`
columns (copied from the .jsonl line when the trace was generated, so a moved prompt file does
not matter); a trace without them is looked up in the prompt file its job read (its launch
directory, never the current one), only where that line's prompt is the trace's own. The same steps are
functions for pandas users: `label_traces`, `rank_signals` (re-exported by corevital.analysis); the
fitted detectors, layer probes and horizons are fitted.py's, every interval resamples questions.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from corevital.analysis import features, fitted, parallel, plots, report_fitted, scoring
from corevital.analysis.tables import load_sweep, parquet_files
from corevital.assess import health, signals
from corevital.core import grading
from corevital.core.config import ConfigError
from corevital.core.files import outputs_under, temp_suffix
from corevital.core.prompts import INLINE_SOURCE, PromptError, load_prompts
from corevital.output import trackers

OUT_DIR = "evaluation"
POOLED = fitted.POOLED  # the rows pooled over models
LABELS_SCHEMA = pa.schema(
    [("trace_id", pa.string()), ("model", pa.string()), ("correct", pa.bool_()), ("graded", pa.string())]
)
SIGNALS_SCHEMA = pa.schema(
    [("signal", pa.string()), ("model", pa.string()), ("direction", pa.int32()), *fitted.SUMMARY_FIELDS]
)
ROC_CURVES = 6  # ROC curves drawn per panel: the best by AUROC, plus the baselines
AGREEMENT = "answer_agreement"  # the consistency baseline (answer_agreement), ranked beside the signals


class EvaluateError(ValueError):
    """A run that cannot be evaluated; the message says why and what to do."""


def ranked() -> list[tuple[str, int]]:
    """(column, direction) of everything ranked: each signal, then each health flag (+1)."""
    return [(s.name, s.direction) for s in signals.SIGNALS] + [(AGREEMENT, -1)] + [(f.column, +1) for f in health.FLAGS]


def baselines() -> list[str]:
    """The signals every ranked table and figure shows: length, mean log-prob, answer agreement."""
    return [s.name for s in signals.SIGNALS if s.baseline] + [AGREEMENT]


def roc_shown(rows: pd.DataFrame) -> list[str]:
    """The signals whose ROC curves are drawn for one model's rows of the ranking (in its order):
    the ROC_CURVES best with an AUROC, then the baselines among the rest (the report's figure,
    the viewer's evaluation page)."""
    rows = rows[rows.auroc.notna()]
    return list(dict.fromkeys(list(rows.signal[:ROC_CURVES]) + [b for b in baselines() if b in set(rows.signal)]))


def load_traces(path: str | Path) -> pd.DataFrame:
    """Every trace row under a run or sweep dir, strings as plain objects."""

    try:
        df = load_sweep(path, table="traces")
    except FileNotFoundError:
        raise EvaluateError(f"no traces.parquet under {path}; give a job dir or a sweep dir of finished jobs") from None
    for c in df.columns:
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(object)
    return df


def launch_dir(job_dir: Path) -> Path | None:
    """The directory a job was started from (Hydra records it in `.hydra/hydra.yaml`), against
    which its relative `prompt_source` was read; None where the job dir records none."""
    from omegaconf import OmegaConf

    recorded = job_dir / ".hydra" / "hydra.yaml"
    if not recorded.is_file():
        return None
    cwd = OmegaConf.select(OmegaConf.load(recorded), "hydra.runtime.cwd")
    return Path(cwd) if cwd else None


def recorded_prompt_file(source: str, job_dir: Path) -> Path:
    """The prompt file a job read: `prompt_source` as recorded, relative to the job's own launch
    directory (never the current directory, which may hold an unrelated file of that name)."""
    if Path(source).is_absolute():
        return Path(source)
    cwd = launch_dir(job_dir)
    if cwd is None:
        raise EvaluateError(
            f"the traces of {job_dir} carry no answers and the job records no launch directory to find "
            f"its prompt file {source!r} from; rerun it with answers in the .jsonl file"
        )
    return cwd / source


def _job_of_traces(root: Path) -> dict[str, Path]:
    """trace_id -> the job dir whose traces.parquet holds it."""
    found = {}
    for f in parquet_files(root, "traces.parquet"):
        for tid in pq.read_table(f, columns=["trace_id"]).column("trace_id").to_pylist():
            found[tid] = Path(f).parent
    return found


def _answers_from_file(path: Path, rows: pd.DataFrame) -> list[tuple[tuple[str, ...] | None, str | None]]:
    """(answers, grader) for each trace in `rows`, from line `prompt_index` of the prompt file
    at `path`, only where that line's prompt is the trace's own prompt text."""
    if not path.is_file():
        raise EvaluateError(
            f"the traces' prompt file {path} (recorded by their job) no longer exists, and the traces "
            f"carry no answers; restore the file or rerun with answers in it"
        )
    try:
        prompts = load_prompts(str(path), None, "")
    except PromptError as e:
        raise EvaluateError(str(e)) from None
    out = []
    for index, text in zip(rows.prompt_index, rows.prompt_text):
        line = prompts[int(index)] if 0 <= int(index) < len(prompts) else None
        if line is None or line.text != text:
            raise EvaluateError(
                f"prompt {int(index)} of {path} is not the prompt its trace was generated from (the "
                f"file changed since the run), so its answer cannot be trusted; restore the file or "
                f"rerun the job"
            )
        out.append((line.answer, line.grader))
    return out


def attach_answers(traces: pd.DataFrame, root: str | Path = ".") -> pd.DataFrame:
    """`traces` with every trace's `answer` and `grader`: those recorded in the trace when it was
    generated; for a trace without them, its prompt file's line, read from the path its job
    recorded (`recorded_prompt_file`) and only if that line's prompt is the trace's own.
    An EvaluateError names the first trace still without an answer, or an empty answer."""
    traces = traces.copy()
    if "answer" not in traces:
        traces["answer"], traces["grader"] = None, None
    missing = traces.answer.isna() & (traces.prompt_source != INLINE_SOURCE)
    if missing.any():
        jobs = _job_of_traces(Path(root))
        job = traces.trace_id.map(jobs)
        for (source, job_dir), rows in traces[missing].groupby(
            [traces.prompt_source[missing], job[missing]], sort=False
        ):
            pairs = _answers_from_file(recorded_prompt_file(source, job_dir), rows)
            traces.loc[rows.index, "answer"] = pd.Series([p[0] for p in pairs], index=rows.index, dtype=object)
            traces.loc[rows.index, "grader"] = pd.Series([p[1] for p in pairs], index=rows.index, dtype=object)
    still = traces.answer.isna()
    if still.any():
        first = traces[still].iloc[0]
        raise EvaluateError(
            f"{int(still.sum())} of {len(traces)} traces have no answer to grade against (the first: "
            f'prompt {first.prompt_index} of {first.prompt_source}); give every .jsonl line an "answer"'
        )
    empty = traces.answer.map(lambda a: len(a) == 0 or any(not str(x).strip() for x in a))
    if empty.any():
        first = traces[empty].iloc[0]
        raise EvaluateError(
            f"prompt {first.prompt_index} of {first.prompt_source} has an empty answer, which would grade "
            f"every output correct; give it a real answer"
        )
    return traces


def label_traces(traces: pd.DataFrame) -> pd.DataFrame:
    """labels.parquet's rows: each trace graded against its `answer` with its `grader`."""
    graded = []
    for output, answer, grader in zip(traces.output_text, traces.answer, traces.grader):
        try:
            graded.append(grading.grade(output, list(answer), grader or "contains"))
        except grading.GradeError as e:
            raise EvaluateError(str(e)) from None
    return pd.DataFrame(
        {
            "trace_id": traces.trace_id.astype(str).to_numpy(),
            "model": traces.model.astype(str).to_numpy(),
            "correct": np.array([g[0] for g in graded], dtype=bool),
            "graded": [g[1] for g in graded],
        }
    )


def answer_agreement(traces: pd.DataFrame, labels: pd.DataFrame) -> pd.Series:
    """Per trace (indexed like `traces`): the share of its question's other traces (seeds, samples,
    and other models' answers to it) whose graded text (labels.parquet's `graded`) equals its
    own; NaN where the question has no other trace. It reads no label: only what was answered."""
    graded = traces.trace_id.map(labels.set_index("trace_id").graded)
    key = pd.DataFrame({"q": fitted.question_ids(traces), "g": graded})
    same = key.groupby(["q", "g"], dropna=False).g.transform("size")  # traces with this exact text
    total = key.groupby("q").q.transform("size")
    return ((same - 1) / (total - 1)).where(total > 1).astype(np.float64)


def rank_signals(traces: pd.DataFrame, labels: pd.DataFrame, resamples: int = scoring.RESAMPLES) -> pd.DataFrame:
    """signals.parquet's rows: per signal and flag, per model and pooled (`model` = "all"),
    sorted by model (pooled first) then AUROC (highest first; undefined last)."""
    merged = graded(traces, labels)

    def rows_of(model: str, g: pd.DataFrame) -> list[dict]:
        wrong, questions, rows = ~g.correct.to_numpy(dtype=bool), g.question.to_numpy(), []
        for column, direction in ranked():
            values = (
                pd.to_numeric(g[column], errors="coerce").to_numpy(dtype=np.float64)
                if column in g
                else np.full(len(g), np.nan)
            )
            score = scoring.summary(wrong, direction * values, resamples, questions)
            rows.append({"signal": column, "model": model, "direction": direction, **score})
        return rows

    return fitted.pooled_first(fitted.per_model(merged, rows_of), SIGNALS_SCHEMA.names)


def with_baselines(traces: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """`traces` with each trace's `question` (fitted.question_ids) and `answer_agreement`; as they
    are when they already have both (evaluate adds them once, for every step after grading)."""
    if {"question", AGREEMENT} <= set(traces.columns):
        return traces
    return traces.assign(question=fitted.question_ids(traces), **{AGREEMENT: answer_agreement(traces, labels)})


def graded(traces: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """The graded traces (with_baselines' columns) with their `correct`, one row per trace."""
    return with_baselines(traces, labels).merge(
        labels[["trace_id", "correct"]], on="trace_id", how="inner", validate="one_to_one"
    )


def fit_detectors(
    root: Path, traces: pd.DataFrame, labels: pd.DataFrame, resamples: int, workers: int | None = None
) -> fitted.Fitted:
    """detectors, predictions, layers and early (fitted.py) for the traces under `root`, their
    per-layer features read from the jobs' summaries.parquet chunk by chunk (features.read);
    `workers`: processes for both (None: each step decides by its size)."""
    merged = graded(traces, labels)
    files = outputs_under(root, "summaries.parquet") if root.is_dir() else []  # none: per-trace signals only
    feats = features.read([str(f) for f in files], workers=workers)
    return fitted.fit(merged, [c for c, _ in ranked()], feats, resamples, workers)


def check_rankable(labels: pd.DataFrame) -> None:
    """An EvaluateError when AUROC is undefined for the pooled traces (all correct or all wrong)."""
    n, wrong = len(labels), int((~labels.correct).sum())
    if wrong == 0:
        raise EvaluateError(
            f"every one of the {n} traces is correct, so AUROC is undefined (it needs wrong answers "
            f"too) and no signal can be ranked; evaluate a harder prompt set"
        )
    if wrong == n:
        raise EvaluateError(
            f"every one of the {n} traces is wrong, so AUROC is undefined (it needs correct answers "
            f"too) and no signal can be ranked; evaluate an easier prompt set"
        )


def evaluate(path: str | Path, resamples: int = scoring.RESAMPLES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labels, signals) for every trace under `path`, as `corevital evaluate` computes them."""
    traces = attach_answers(load_traces(path), path)
    labels = label_traces(traces)
    check_rankable(labels)
    return labels, rank_signals(traces, labels, resamples)


def table_text(ranking: pd.DataFrame, labels: pd.DataFrame) -> str:
    """The ranked table as text, one block per model (pooled first); baselines marked."""
    base, lines = set(baselines()), []
    for model, g in ranking.groupby("model", sort=False):
        n_lab = labels if model == POOLED else labels[labels.model == model]
        lines.append(
            f"model {model}: {len(n_lab)} traces, {int((~n_lab.correct).sum())} wrong "
            f"(accuracy {n_lab.correct.mean():.1%})"
        )
        lines.append(
            f"  {'signal':<30} {'dir':>3} {'n':>6} {'wrong':>6}  {'AUROC':>5}  {'95% interval':<13}  {'PRR':>6}"
        )
        for r in g.itertuples():
            mark = "  (baseline)" if r.signal in base else ""
            lines.append(
                f"  {r.signal:<30} {r.direction:+3d} {r.n:6d} {r.n_wrong:6d}  {_f(r.auroc, 3):>5}  "
                f"{_f(r.auroc_low, 2)}-{_f(r.auroc_high, 2):<8}  {_f(r.prr, 3):>6}{mark}"
            )
    return "\n".join(lines)


def _f(x: float, digits: int) -> str:
    return "n/a" if not np.isfinite(x) else f"{round(x, digits) + 0.0:.{digits}f}"  # never "-0.000"


def roc_figure(traces: pd.DataFrame, labels: pd.DataFrame, ranking: pd.DataFrame) -> bytes:
    """ROC curves: one panel per model (pooled first; only the pooled one for a single model), the
    ROC_CURVES best signals plus the baselines."""
    plt = plots.pyplot()
    merged = graded(traces, labels)
    models = list(dict.fromkeys(ranking.model))
    models = models[:1] if len(models) == 2 else models  # one model: its panel would repeat the pooled one
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        g = merged if model == POOLED else merged[merged.model == model]
        rows = ranking[ranking.model == model]
        for name in roc_shown(rows):
            r = rows[rows.signal == name].iloc[0]
            values = pd.to_numeric(g[name], errors="coerce").to_numpy(dtype=np.float64)
            fpr, tpr = scoring.roc_curve(~g.correct.to_numpy(dtype=bool), r.direction * values)
            style = "--" if name in baselines() else "-"
            ax.plot(fpr, tpr, style, lw=1.4, label=f"{name} {r.auroc:.3f} [{r.auroc_low:.2f}, {r.auroc_high:.2f}]")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlabel("false positive rate (correct traces flagged)")
        ax.set_ylabel("true positive rate (wrong traces flagged)")
        ax.set_title(f"model {model}: predicting a wrong answer")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    return plots.png(fig)


def report_html(root: Path, labels: pd.DataFrame, ranking: pd.DataFrame, png: bytes, more: str = "") -> str:
    base = set(baselines())
    head = "".join(
        f"<th>{h}</th>" for h in ("model", "signal", "direction", "n", "n_wrong", "AUROC", "95% interval", "PRR")
    )
    body = "".join(
        f"<tr{' class=b' if r.signal in base else ''}><td>{html.escape(r.model)}</td><td>{html.escape(r.signal)}</td>"
        f"<td>{r.direction:+d}</td><td>{r.n}</td><td>{r.n_wrong}</td><td>{_f(r.auroc, 3)}</td>"
        f"<td>{_f(r.auroc_low, 3)} - {_f(r.auroc_high, 3)}</td><td>{_f(r.prr, 3)}</td></tr>"
        for r in ranking.itertuples()
    )
    summary = (
        f"{len(labels)} traces, {int((~labels.correct).sum())} wrong (accuracy {labels.correct.mean():.1%}). "
        f"AUROC: probability that a wrong trace has a higher risk score (direction x value) than a correct one, "
        f"ties one half; interval: 95% bootstrap over questions, {scoring.RESAMPLES} resamples by default, seed "
        f"{scoring.SEED}; PRR: prediction-rejection ratio (1 oracle, 0 random). Baselines in bold."
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>CoreVital evaluation: "
        f"{html.escape(str(root))}</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid "
        "#ddd;text-align:right}tr.b{font-weight:bold}</style></head><body>"
        f"<h1>CoreVital evaluation</h1><p>{html.escape(str(root.resolve()))}</p><p>{html.escape(summary)}</p>"
        f"<figure><img alt='ROC curves' src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>"
        f"<table><tr>{head}</tr>{body}</table>{more}</body></html>"
    )


def write(
    root: Path, traces: pd.DataFrame, labels: pd.DataFrame, ranking: pd.DataFrame, fits: fitted.Fitted | None = None
) -> Path:
    """Write DIR/evaluation/ whole: into a temporary folder, then renamed into place."""
    out = root / OUT_DIR
    tmp, old = root / f".{OUT_DIR}.tmp-{temp_suffix()}", root / f".{OUT_DIR}.old-{temp_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        pq.write_table(pa.Table.from_pandas(labels, schema=LABELS_SCHEMA, preserve_index=False), tmp / "labels.parquet")
        pq.write_table(
            pa.Table.from_pandas(ranking, schema=SIGNALS_SCHEMA, preserve_index=False), tmp / "signals.parquet"
        )
        more = ""
        if fits is not None:
            for name, schema in fitted.SCHEMAS.items():
                table = pa.Table.from_pandas(getattr(fits, name), schema=schema, preserve_index=False)
                pq.write_table(table, tmp / f"{name}.parquet")
            more = report_fitted.html_section(fits, baselines())
        png = roc_figure(traces, labels, ranking)
        (tmp / "report.html").write_text(report_html(root, labels, ranking, png, more), encoding="utf-8")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="corevital evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a job dir or a sweep dir")
    p.add_argument(
        "--resamples", type=int, default=scoring.RESAMPLES, help="bootstrap resamples for the AUROC interval"
    )
    a = p.parse_args(argv)
    root = Path(a.path)
    try:
        traces = attach_answers(load_traces(root), root)
        workers = parallel.workers() if len(traces) >= fitted.PARALLEL_FROM else 1
        ready = parallel.warm(workers)  # the workers start while the traces are graded and ranked
        labels = label_traces(traces)
        check_rankable(labels)
        traces = with_baselines(traces, labels)
        ranking = rank_signals(traces, labels, a.resamples)
        ready()
        fits = fit_detectors(root, traces, labels, a.resamples, workers)
        out = write(root, traces, labels, ranking, fits)
    except EvaluateError as e:
        print(f"corevital: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"corevital: error: could not write {root / OUT_DIR}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(table_text(ranking, labels))
    print(report_fitted.detectors_text(fits))
    print(
        f"corevital: evaluation: {out} (labels, signals, detectors, predictions, layers and early .parquet; "
        f"report.html)"
    )
    for line in log_to_trackers(root, ranking, out):
        print(line, file=sys.stderr)
    return 0


def log_to_trackers(root: Path, ranking: pd.DataFrame, out: Path) -> list[str]:
    """Each evaluated job that was logged to a tracker (its status.json says which run) gets
    this evaluation in that run: metrics auroc/<signal> (pooled over every evaluated trace) and
    signals.parquet under evaluation/. Returns one line per run it could not reach (the
    evaluation itself is written either way)."""
    pooled = ranking[ranking.model == POOLED]
    metrics = {f"auroc/{r.signal}": r.auroc for r in pooled.itertuples()}
    problems = []
    for traces in parquet_files(root, "traces.parquet"):
        status = Path(traces).parent / "status.json"
        try:
            ref = json.loads(status.read_text()).get("tracker") if status.is_file() else None
        except ValueError:
            ref = None
        if not ref:
            continue
        try:
            run = trackers.reopen(ref)
            run.log(metrics, [], {"evaluation": out / "signals.parquet"})
            run.end(ok=True)
        except (trackers.TrackerError, ConfigError) as e:
            problems.append(f"corevital: warning: {Path(traces).parent.name}: {e}")
    return problems


if __name__ == "__main__":
    raise SystemExit(main())
