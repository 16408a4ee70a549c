"""What `corevital evaluate` fits to the labels, all scored out of fold (detectors.py) with
intervals that resample questions (scoring.auroc_interval):

    detectors    each detector of detectors.DETECTORS over every trace of a model
    predictions  the out-of-fold score behind each detector's AUROC, with the trace's question and fold
    layers       layer blame: a logistic probe on one layer's features alone, per layer
    early        the failure horizon: each signal and detector recomputed from the first k generated rows

Per model (a detector of one model's traces), then pooled over models (`model` = "all", the
union of the models' out-of-fold scores). Layer probes are per model only: layer 12 of two
models is not one thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from corevital.analysis import detectors, features, scoring
from corevital.assess import signals

POOLED = "all"


@dataclass
class Fitted:
    detectors: pd.DataFrame  # detector, model, n, n_wrong, auroc, auroc_low, auroc_high, prr
    predictions: pd.DataFrame  # trace_id, question, fold, detector, score
    layers: pd.DataFrame  # model, layer_index, auroc, auroc_low, auroc_high
    early: pd.DataFrame  # signal, model, k, auroc


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


def fit(
    merged: pd.DataFrame, signal_columns: list[str], feats: features.Features, resamples: int = scoring.RESAMPLES
) -> Fitted:
    """`merged`: one row per graded trace (traces.parquet's columns, `correct`, `question` and
    every column of `signal_columns`); `feats`: the per-layer features and the signals at each
    horizon (features.read over the same traces)."""
    layer0 = feats.layers.get(0, pd.DataFrame({"trace_id": pd.Series([], dtype=object)}))
    frame = merged.merge(layer0, on="trace_id", how="left", validate="one_to_one")
    layer_columns = [c for c in layer0.columns if c != "trace_id"]
    columns = signal_columns + layer_columns
    preds, layer_rows, early_rows = [], [], []
    for model, g in frame.groupby("model", sort=True):
        g = g.reset_index(drop=True)
        wrong = ~g.correct.to_numpy(dtype=bool)
        fold = detectors.folds(wrong, g.question.to_numpy())
        if fold is None:
            continue  # too few questions, or wrong or correct traces, for two folds: nothing is scored
        scores = detectors.fit_detectors(g, columns, wrong, fold)
        for name, s in scores.items():
            preds.append(
                pd.DataFrame(
                    {"trace_id": g.trace_id, "question": g.question, "fold": fold, "detector": name, "score": s}
                )
            )
        layer_rows += _layers(str(model), g, layer_columns, wrong, fold, resamples)
        early_rows += _early(str(model), g, feats, scores, wrong, fold)
    predictions = pd.concat(preds, ignore_index=True) if preds else _empty_predictions()
    det = _detector_rows(predictions, frame, resamples)
    early = pd.DataFrame(early_rows, columns=["signal", "model", "k", "auroc"])
    early = pd.concat([_pooled_early(frame, feats, early), early], ignore_index=True)
    return Fitted(det, predictions, pd.DataFrame(layer_rows, columns=LAYER_COLUMNS), early)


LAYER_COLUMNS = ["model", "layer_index", "auroc", "auroc_low", "auroc_high"]


def _empty_predictions() -> pd.DataFrame:
    return pd.DataFrame({"trace_id": [], "question": [], "fold": [], "detector": [], "score": []})


DETECTOR_COLUMNS = ["detector", "model", "n", "n_wrong", "auroc", "auroc_low", "auroc_high", "prr"]


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

    return pooled_first(per_model(labelled, rows_of) if len(labelled) else [], DETECTOR_COLUMNS)


def _layers(model: str, g: pd.DataFrame, columns: list[str], wrong, fold, resamples: int) -> list[dict]:
    """One row per layer: the out-of-fold AUROC of a probe on that layer's features alone."""
    by_layer: dict[int, list[str]] = {}
    for c in columns:
        by_layer.setdefault(features.layer_of(c), []).append(c)
    rows = []
    for layer in sorted(by_layer):
        s = detectors.layer_probe(g, by_layer[layer], wrong, fold)
        low, high = scoring.auroc_interval(wrong, s, resamples, groups=g.question.to_numpy())
        rows.append(
            {
                "model": model,
                "layer_index": layer,
                "auroc": scoring.auroc(wrong, s),
                "auroc_low": low,
                "auroc_high": high,
            }
        )
    return rows


def _horizon_frame(g: pd.DataFrame, feats: features.Features, k: int) -> tuple[pd.DataFrame, list[str]]:
    """g's traces with the signals and per-layer features of their first k generated rows only."""
    sig, lay = feats.signals[k], feats.layers[k]
    frame = g[["trace_id"]].merge(sig, on="trace_id", how="left").merge(lay, on="trace_id", how="left")
    return frame, [c for c in frame.columns if c != "trace_id"]


def _early(model: str, g: pd.DataFrame, feats: features.Features, full: dict, wrong, fold) -> list[dict]:
    """early.parquet's rows for one model: each signal, and each detector refitted (out of fold,
    same folds) on what the first k generated rows give; k = 0 is the whole answer (the
    detectors' own scores, which also read the flags and answer_agreement)."""
    rows = []
    for k in [k for k in features.HORIZONS if k == 0 or k in feats.signals]:  # k > 0 needs the jobs' rows
        frame, columns = _horizon_frame(g, feats, k) if k else (g, [])
        for s in signals.SIGNALS:
            v = pd.to_numeric(frame[s.name], errors="coerce").to_numpy(dtype=np.float64)
            rows.append({"signal": s.name, "model": model, "k": k, "auroc": scoring.auroc(wrong, s.direction * v)})
        scores = full if k == 0 else detectors.fit_detectors(frame, columns, wrong, fold)
        rows += [{"signal": n, "model": model, "k": k, "auroc": scoring.auroc(wrong, s)} for n, s in scores.items()]
    return rows


def _pooled_early(frame: pd.DataFrame, feats: features.Features, early: pd.DataFrame):
    """The pooled rows of early.parquet: each signal over every model's traces (per-model rows
    only, when there is one model, are the same numbers)."""
    if frame.model.nunique() <= 1:
        return early.assign(model=POOLED)
    wrong = ~frame.correct.to_numpy(dtype=bool)
    rows = []
    for k in [k for k in features.HORIZONS if k == 0 or k in feats.signals]:
        f = _horizon_frame(frame, feats, k)[0] if k else frame
        for s in signals.SIGNALS:
            v = pd.to_numeric(f[s.name], errors="coerce").to_numpy(dtype=np.float64)
            rows.append({"signal": s.name, "model": POOLED, "k": k, "auroc": scoring.auroc(wrong, s.direction * v)})
    return pd.DataFrame(rows)
