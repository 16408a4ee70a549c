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
    bins per feature, shallow trees against overfitting a few thousand traces). 50 rounds at
    learning rate 0.15: on the labelled set of docs/evaluate.md, 80 rounds at 0.1 cost 1.6x as
    much for an out-of-fold AUROC 0.001 higher. No early stopping: scikit-learn's would start
    at 10,000 traces, on a validation split that ignores the questions."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=50, learning_rate=0.15, max_leaf_nodes=8, min_samples_leaf=20, l2_regularization=1.0,
        max_bins=32, early_stopping=False, random_state=SEED,
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
    X = X[:, varying(X)]
    scores = np.empty(len(wrong))
    for f in np.unique(fold):
        test = fold == f
        train_y = wrong[~test]
        if train_y.all() or not train_y.any():
            scores[test] = train_y.mean()
            continue
        model = make().fit(np.asfortranarray(X[~test]), train_y)  # column-major: the trees bin a column at a time
        scores[test] = model.predict_proba(X[test])[:, 1]
    return scores


def varying(X: np.ndarray) -> np.ndarray:
    """(columns,) bool: the columns of X a model can use, those with two values or more (a
    missing value counts as one). A column of one value on every trace (at k = 1, attention to
    the prompt is 1 on every layer below the first generated token) or of none at all gives no
    split and no weight, only work."""
    seen = ~np.isnan(X)  # (traces, columns)
    low = np.where(seen, X, np.inf).min(0)
    high = np.where(seen, X, -np.inf).max(0)
    return seen.any(0) & ((low < high) | ~seen.all(0))


def fit_all(X: np.ndarray, columns: list[str], wrong: np.ndarray, fold: np.ndarray) -> dict[str, np.ndarray]:
    """Each detector's out-of-fold scores, by name, each fitted on the columns of X it reads
    (X: matrix(frame, columns))."""
    index = {c: j for j, c in enumerate(columns)}
    return {d.name: out_of_fold(d.make, X[:, [index[c] for c in d.reads(columns)]], wrong, fold) for d in DETECTORS}


def matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The feature columns as float64 (traces, columns), booleans 0/1, null as NaN."""
    sub = frame[columns]
    text = [c for c in columns if sub[c].dtype == object]  # e.g. an all-null column read back: values or None
    if text:
        sub = sub.assign(**{c: pd.to_numeric(sub[c], errors="coerce") for c in text})
    return sub.to_numpy(dtype=np.float64, na_value=np.nan)


def markdown_table() -> str:
    """docs/evaluate.md's detector table."""
    rows = ["| detector | definition |", "|---|---|"]
    rows += [f"| `{d.name}` | {d.definition} |" for d in DETECTORS]
    return "\n".join(rows)
