"""Detectors fitted to the labels, and layer probes, scored only out of fold (docs/evaluate.md,
"Fitted detectors").

A fitted score is only worth what it does on traces it was not fitted to, and seeds or samples
of one question are near-copies of each other: a model that saw one of them in training has
seen the answer. So every score here comes from cross-validation grouped by question
(scikit-learn's StratifiedGroupKFold: all traces of a question in one fold, folds balanced for
wrong answers): each trace is scored by the model fitted on the other folds, and the AUROC is
computed over those out-of-fold scores (`out_of_fold`). Each detector is declared once, in
DETECTORS: its name, what it reads and the scikit-learn estimator it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

FOLDS = 5
SEED = 0


def logistic():
    """Logistic regression on standardised features, missing values set to the training median."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def boosted():
    """Gradient-boosted trees (HistGradientBoosting: missing values handled by the trees, 32
    bins per feature, shallow trees and a small learning rate against overfitting a few
    thousand traces)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=80, learning_rate=0.1, max_leaf_nodes=8, min_samples_leaf=20, l2_regularization=1.0,
        max_bins=32, random_state=SEED,
    )  # fmt: skip


def _signals(columns: list[str]) -> list[str]:
    return [c for c in columns if "@" not in c]


@dataclass(frozen=True)
class Detector:
    name: str
    definition: str
    make: Callable[[], object]  # a fresh scikit-learn classifier
    reads: Callable[[list[str]], list[str]]  # which of the feature columns it is fitted on


DETECTORS = (
    Detector(
        "logistic_signals",
        "logistic regression on every per-trace signal and health flag (standardised, missing values set to "
        "the training median)",
        logistic,
        _signals,
    ),
    Detector(
        "boosted_all",
        "gradient-boosted trees (scikit-learn's HistGradientBoosting) on every per-trace signal and flag and every "
        "per-layer feature: each per-layer metric's mean over the generated rows, per layer, and each head's share "
        "of attention on the prompt when per-head values were captured (Lookback Lens)",
        boosted,
        lambda columns: columns,
    ),
)


def folds(wrong: np.ndarray, questions: np.ndarray, n: int = FOLDS) -> np.ndarray | None:
    """The fold (0..n-1) of each trace: grouped by question (all its traces in one fold),
    stratified for wrong answers as far as the groups allow, shuffled with SEED. Fewer folds
    where there are fewer questions, wrong or correct traces than n; None below 2 (nothing can
    be scored out of fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = min(n, len(np.unique(questions)), int(wrong.sum()), int((~wrong).sum()))
    if n < 2:
        return None
    fold = np.full(len(wrong), -1, np.int32)
    split = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=SEED)
    for f, (_, test) in enumerate(split.split(np.zeros(len(wrong)), wrong.astype(int), questions)):
        fold[test] = f
    return fold


def out_of_fold(make, X: np.ndarray, wrong: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Each trace's risk score (the fitted probability of a wrong answer) from the model fitted
    on the other folds; a fold whose training part holds one class only gets that part's rate."""
    scores = np.empty(len(wrong))
    for f in np.unique(fold):
        test = fold == f
        train_y = wrong[~test]
        if train_y.all() or not train_y.any():
            scores[test] = train_y.mean()
            continue
        model = make().fit(X[~test], train_y)
        scores[test] = model.predict_proba(X[test])[:, 1]
    return scores


def matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The feature columns as float64, booleans 0/1, null as NaN; columns without any value dropped."""
    X = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return X[:, ~np.isnan(X).all(0)] if X.size else X


def fit_detectors(
    frame: pd.DataFrame, columns: list[str], wrong: np.ndarray, fold: np.ndarray
) -> dict[str, np.ndarray]:
    """Each detector's out-of-fold scores over `frame`'s traces, by name."""
    return {d.name: out_of_fold(d.make, matrix(frame, d.reads(columns)), wrong, fold) for d in DETECTORS}


def layer_probe(frame: pd.DataFrame, columns: list[str], wrong: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of a logistic probe fitted on one layer's features (`columns`)."""
    return out_of_fold(logistic, matrix(frame, columns), wrong, fold)


def markdown_table() -> str:
    """docs/evaluate.md's detector table."""
    rows = ["| detector | definition |", "|---|---|"]
    rows += [f"| `{d.name}` | {d.definition} |" for d in DETECTORS]
    return "\n".join(rows)
