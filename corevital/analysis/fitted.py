"""What `corevital evaluate` fits to the labels, all scored out of fold (detectors.py) with
intervals that resample questions (scoring.auroc_interval):

    detectors    each detector of detectors.DETECTORS over every trace of a model
    predictions  the out-of-fold score behind each detector's AUROC, with the trace's question and fold
    layers       layer blame: a logistic probe on one layer's features alone, per layer
    early        the failure horizon: each signal and detector recomputed from the first k generated rows

Per model (a detector of one model's traces), then pooled over models (`model` = "all", the
union of the models' out-of-fold scores). Layer probes are per model only: layer 12 of two
models is not one thing.

Every out-of-fold fit (a detector at a horizon, a layer probe) is planned first (`_plan`) and
the fits are shared out over worker processes (parallel.py), biggest first; the feature
matrices are built as the workers take them, so a few are held at a time, not all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa

from corevital.analysis import detectors, features, parallel, scoring
from corevital.assess import signals

POOLED = "all"
SUMMARY_FIELDS = [  # a ranked table's numbers for one score (scoring.summary), after its name and model
    ("n", pa.int32()),
    ("n_wrong", pa.int32()),
    ("auroc", pa.float64()),
    ("auroc_low", pa.float64()),
    ("auroc_high", pa.float64()),
    ("prr", pa.float64()),
]
INTERVAL_FIELDS = [("auroc", pa.float64()), ("auroc_low", pa.float64()), ("auroc_high", pa.float64())]
SCHEMAS = {  # each table of Fitted as evaluation/<name>.parquet holds it
    "detectors": pa.schema([("detector", pa.string()), ("model", pa.string()), *SUMMARY_FIELDS]),
    "predictions": pa.schema(
        [
            ("trace_id", pa.string()),
            ("question", pa.string()),
            ("fold", pa.int32()),
            ("detector", pa.string()),
            ("score", pa.float64()),
        ]
    ),
    "layers": pa.schema([("model", pa.string()), ("layer_index", pa.int32()), *INTERVAL_FIELDS]),
    "early": pa.schema([("signal", pa.string()), ("model", pa.string()), ("k", pa.int32()), ("auroc", pa.float64())]),
}


@dataclass
class Fitted:
    """fit()'s tables, columns as in SCHEMAS."""

    detectors: pd.DataFrame
    predictions: pd.DataFrame
    layers: pd.DataFrame
    early: pd.DataFrame


def per_model(frame: pd.DataFrame, rows_of) -> list[dict]:
    """A ranked table's rows: `rows_of(model, traces)` for the pooled traces (`model` = POOLED),
    then for each model's; with one model, its rows are the pooled rows under its name."""
    models = [(str(m), g) for m, g in frame.groupby("model", sort=True)]
    pooled = rows_of(POOLED, frame)
    if len(models) == 1:
        return pooled + [{**r, "model": models[0][0]} for r in pooled]
    return pooled + [r for model, g in models for r in rows_of(model, g)]


def pooled_first(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """`rows` as a table sorted by model (pooled first), then AUROC (highest first, undefined last)."""
    out = pd.DataFrame(rows, columns=columns)
    out["_pooled"] = out.model != POOLED
    out = out.sort_values(
        ["_pooled", "model", "auroc"], ascending=[True, True, False], na_position="last", kind="stable"
    )
    return out.drop(columns="_pooled").reset_index(drop=True)


def question_ids(traces: pd.DataFrame) -> np.ndarray:
    """One id per question, a (prompt_source, prompt_index) pair: '<source>#<index>'."""
    return (traces.prompt_source.astype(str) + "#" + traces.prompt_index.astype(int).astype(str)).to_numpy()


PARALLEL_FROM = 2000  # traces: fewer are fitted in this process (a worker's start would cost more)


@dataclass
class _Model:
    """One model's graded traces with their per-layer features, and the folds they are scored in."""

    name: str
    frame: pd.DataFrame
    wrong: np.ndarray
    fold: np.ndarray

    @cached_property
    def labels(self) -> tuple:
        """What a worker needs besides the features (name, wrong, fold, question number): small
        arrays, where the frame would be pickled whole."""
        question = pd.factorize(self.frame.question, sort=True)[0]  # numbered as np.unique would: the same draws
        return self.name, self.wrong, self.fold, question


@dataclass(frozen=True)
class _Fit:
    """Out-of-fold fits to run for `model` (an index into the models): every detector at
    horizon k (`at`; k = 0 the whole answer), or the probe of layer `at`; `features` builds the
    columns they read, as (names, matrix)."""

    model: int
    what: str  # "detectors" or "layer"
    at: int
    features: object  # () -> (column names, their matrix)


def fit(
    merged: pd.DataFrame,
    signal_columns: list[str],
    feats: features.Features,
    resamples: int = scoring.RESAMPLES,
    workers: int | None = None,
) -> Fitted:
    """`merged`: one row per graded trace (traces.parquet's columns, `correct`, `question` and
    every column of `signal_columns`); `feats`: the per-layer features and the signals at each
    horizon (features.read over the same traces). `workers`: processes for the fits (None: one
    per core from PARALLEL_FROM traces on, else this process)."""
    layer0 = feats.layers.get(0, pd.DataFrame({"trace_id": pd.Series([], dtype=object)}))
    frame = merged.merge(layer0, on="trace_id", how="left", validate="one_to_one")
    layer_columns = [c for c in layer0.columns if c != "trace_id"]
    models = []
    for model, g in frame.groupby("model", sort=True):
        g = g.reset_index(drop=True)
        wrong = ~g.correct.to_numpy(dtype=bool)
        fold = detectors.folds(wrong, g.question.to_numpy())
        if fold is not None:  # else too few questions, or wrong or correct traces, for two folds: nothing is scored
            models.append(_Model(str(model), g, wrong, fold))
    plan = _plan(models, feats, signal_columns + layer_columns, layer_columns)
    if workers is None:
        workers = parallel.workers() if len(frame) >= PARALLEL_FROM else 1
    tasks = ((f.what, *f.features(), models[f.model].labels, resamples) for f in plan)
    done = dict(zip(plan, parallel.run(_run_task, tasks, workers)))
    preds, layer_rows, early_rows = [], [], []
    for i, m in enumerate(models):
        mine = {(f.what, f.at): s for f, s in done.items() if f.model == i}
        for name, s in mine["detectors", 0].items():
            preds.append(
                pd.DataFrame(
                    {
                        "trace_id": m.frame.trace_id,
                        "question": m.frame.question,
                        "fold": m.fold,
                        "detector": name,
                        "score": s,
                    }
                )
            )
        layer_rows += [{**row, "layer_index": at} for (what, at), row in sorted(mine.items()) if what == "layer"]
        early_rows += _early(m, feats, {at: s for (what, at), s in mine.items() if what == "detectors"})
    predictions = pd.concat(preds, ignore_index=True) if preds else _empty("predictions")
    det = _detector_rows(predictions, frame, resamples)
    early = pd.DataFrame(early_rows, columns=SCHEMAS["early"].names)
    early = pd.concat([_pooled_early(frame, feats, early), early], ignore_index=True)
    return Fitted(det, predictions, pd.DataFrame(layer_rows, columns=SCHEMAS["layers"].names), early)


def _run_task(what: str, columns: list[str], X: np.ndarray, labels: tuple, resamples: int):
    """A planned fit, in a worker: every detector's out-of-fold scores by name, or a layer
    probe's layers.parquet row. `labels`: _Model.labels."""
    name, wrong, fold, question = labels
    if what == "detectors":
        return detectors.fit_all(X, columns, wrong, fold)
    s = detectors.out_of_fold(detectors.logistic, X, wrong, fold)
    low, high = scoring.auroc_interval(wrong, s, resamples, groups=question)
    return {"model": name, "auroc": scoring.auroc(wrong, s), "auroc_low": low, "auroc_high": high}


def _plan(models: list[_Model], feats: features.Features, columns: list[str], layer_columns: list[str]) -> list[_Fit]:
    """Every model's out-of-fold fits, the detectors (the biggest fits) before the layer probes:
    the detectors on the whole answer (k = 0) and refitted at each horizon k, then a logistic
    probe per layer."""
    plan = [
        _Fit(i, "detectors", k, _columns(m.frame, feats, k, columns))
        for i, m in enumerate(models)
        for k in _horizons(feats)
    ]
    for i, m in enumerate(models):
        plan += [
            _Fit(i, "layer", layer, _columns(m.frame, feats, 0, cols))
            for layer, cols in _by_layer(layer_columns).items()
        ]
    return plan


def _horizons(feats: features.Features) -> list[int]:
    """k = 0, the whole answer, first; then each k whose rows were read (k > 0 needs the jobs' rows)."""
    return [0] + [k for k in features.HORIZONS if k and k in feats.signals]


def _columns(g: pd.DataFrame, feats: features.Features, k: int, columns: list[str]):
    """() -> (names, matrix) of the features a fit reads: at k = 0 `columns` of g itself (which
    also holds the flags and answer_agreement), at k > 0 the signals and per-layer features of
    the first k generated rows (_horizon_frame)."""

    def build():
        frame, names = (g, columns) if k == 0 else _horizon_frame(g, feats, k)
        return names, detectors.matrix(frame, names)

    return build


def _by_layer(columns: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for c in columns:
        out.setdefault(features.layer_of(c), []).append(c)
    return dict(sorted(out.items()))


def _empty(table: str) -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in SCHEMAS[table].names})


def _detector_rows(predictions: pd.DataFrame, frame: pd.DataFrame, resamples: int) -> pd.DataFrame:
    """detectors.parquet's rows: pooled first, then per model; by AUROC within each."""
    labelled = predictions.merge(frame[["trace_id", "model", "correct"]], on="trace_id", how="left")

    def rows_of(model: str, g: pd.DataFrame) -> list[dict]:
        rows = []
        for d in detectors.DETECTORS:
            x = g[g.detector == d.name]
            if len(x):
                wrong, s = ~x.correct.to_numpy(dtype=bool), x.score.to_numpy(dtype=np.float64)
                rows.append(
                    {"detector": d.name, "model": model, **scoring.summary(wrong, s, resamples, x.question.to_numpy())}
                )
        return rows

    return pooled_first(per_model(labelled, rows_of) if len(labelled) else [], SCHEMAS["detectors"].names)


def _horizon_frame(g: pd.DataFrame, feats: features.Features, k: int) -> tuple[pd.DataFrame, list[str]]:
    """g's traces with the signals and per-layer features of their first k generated rows only."""
    sig, lay = feats.signals[k], feats.layers[k]
    frame = g[["trace_id"]].merge(sig, on="trace_id", how="left").merge(lay, on="trace_id", how="left")
    return frame, [c for c in frame.columns if c != "trace_id"]


def _signals_at(g: pd.DataFrame, feats: features.Features, k: int) -> pd.DataFrame:
    """g's traces with each signal of their first k generated rows (k = 0: g's own, the jobs')."""
    return g[["trace_id"]].merge(feats.signals[k], on="trace_id", how="left") if k else g


def _early(m: _Model, feats: features.Features, scores: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    """early.parquet's rows for one model: each signal, and each detector refitted (out of fold,
    same folds) on what the first k generated rows give (`scores`, by k then detector); k = 0 is
    the whole answer (the detectors' own scores, which also read the flags and answer_agreement)."""
    rows = []
    for k in _early_ks(feats):
        rows += _signal_rows(_signals_at(m.frame, feats, k), m.wrong, m.name, k)
        rows += [
            {"signal": d.name, "model": m.name, "k": k, "auroc": scoring.auroc(m.wrong, scores[k][d.name])}
            for d in detectors.DETECTORS
        ]
    return rows


def _pooled_early(frame: pd.DataFrame, feats: features.Features, early: pd.DataFrame):
    """The pooled rows of early.parquet: each signal over every model's traces (per-model rows
    only, when there is one model, are the same numbers)."""
    if frame.model.nunique() <= 1:
        return early.assign(model=POOLED)
    wrong = ~frame.correct.to_numpy(dtype=bool)
    return pd.DataFrame(
        [r for k in _early_ks(feats) for r in _signal_rows(_signals_at(frame, feats, k), wrong, POOLED, k)]
    )


def _early_ks(feats: features.Features) -> list[int]:
    """early.parquet's horizons in its order: each k whose rows were read, then 0 (the whole answer)."""
    return _horizons(feats)[1:] + [0]


def _signal_rows(frame: pd.DataFrame, wrong: np.ndarray, model: str, k: int) -> list[dict]:
    """early.parquet's row of each signal at horizon k, `frame` holding the signals of those rows."""
    rows = []
    for s in signals.SIGNALS:
        v = pd.to_numeric(frame[s.name], errors="coerce").to_numpy(dtype=np.float64)
        rows.append({"signal": s.name, "model": model, "k": k, "auroc": scoring.auroc(wrong, s.direction * v)})
    return rows
