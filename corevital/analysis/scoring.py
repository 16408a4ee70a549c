"""How well a per-trace signal predicts a wrong answer: AUROC, its bootstrap interval, PRR.

Conventions (docs/evaluate.md): `wrong` is True for a wrong answer; a signal's risk
score is `direction * value` (direction +1 when a higher value means more risk). Traces whose
value is missing (NaN) are left out. All functions are plain numpy, no fitting.

- `auroc`: the probability that a random wrong trace has a higher risk score than a random
  correct one, ties counting one half (the Mann-Whitney U statistic over n_wrong x n_correct).
  0.5 is chance, 1 ranks every wrong trace above every correct one, below 0.5 the signal
  points the other way. Undefined (NaN) without both wrong and correct traces.
- `auroc_interval`: 95% percentile interval of the AUROC over RESAMPLES bootstrap resamples of
  questions (every trace of a drawn question, as often as it was drawn), seed SEED.
- `prr`: prediction-rejection ratio (as in LM-Polygraph, Vashurin et al. 2025). Reject the
  riskiest traces first; the rejection curve is the accuracy of the traces kept, as a
  function of the share rejected; PRR = (area under the signal's curve - area under
  random rejection's) / (area under the oracle's, which rejects every wrong trace first -
  random's). 1 is the oracle, 0 is no better than random, negative is worse. Areas are the
  mean, over k = 1..n kept traces, of the accuracy of the k least risky; traces with equal
  risk scores are taken in random order, i.e. their mean accuracy is used (so a bool flag
  gets a well-defined PRR). Undefined (NaN) without both wrong and correct traces.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
SEED = 0


def _clean(wrong, scores, groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """wrong, scores (and groups, when given) of the traces whose score is a number."""
    wrong, scores = np.asarray(wrong, dtype=bool), np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(scores)
    return wrong[keep], scores[keep], None if groups is None else np.asarray(groups)[keep]


def defined(wrong) -> bool:
    """Whether AUROC and PRR are defined: at least one wrong and one correct trace."""
    wrong = np.asarray(wrong, dtype=bool)
    return bool(wrong.any() and (~wrong).any())


def _below_and_equal(correct_sorted: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value: the number of sorted correct scores below it, and equal to it."""
    lo = np.searchsorted(correct_sorted, values, side="left")
    hi = np.searchsorted(correct_sorted, values, side="right")
    return lo, hi - lo


def auroc(wrong, scores) -> float:
    """P(risk of a random wrong trace > that of a random correct one), ties one half; NaN if undefined."""
    wrong, scores, _ = _clean(wrong, scores)
    if not defined(wrong):
        return float("nan")
    correct = np.sort(scores[~wrong])
    below, equal = _below_and_equal(correct, scores[wrong])
    return float((below + 0.5 * equal).sum() / (wrong.sum() * len(correct)))


def auroc_interval(wrong, scores, resamples: int = RESAMPLES, seed: int = SEED, groups=None) -> tuple[float, float]:
    """95% bootstrap percentile interval of `auroc`; (NaN, NaN) if undefined.

    Each resample draws as many groups as there are, with replacement, and takes every trace of
    each drawn group as often as the group was drawn: `groups` (one label per trace) are the
    questions, so a question's seeds and samples, which are not independent, are resampled
    together; None makes each trace its own group. A resample without both a wrong and a
    correct trace is left out. Its AUROC is a weighted version of the same count (weights = how
    often each trace was drawn), so the resamples need one sort in all, not one each.
    """
    wrong, scores, groups = _clean(wrong, scores, groups)
    if not defined(wrong):
        return float("nan"), float("nan")
    _, group = np.unique(np.arange(len(wrong)) if groups is None else groups, return_inverse=True)
    drawn = draws(int(group.max()) + 1, resamples, seed)  # (G, B)
    correct_at = np.flatnonzero(~wrong)[np.argsort(scores[~wrong], kind="stable")]  # correct traces, by score
    lo, eq = _below_and_equal(scores[correct_at], scores[wrong])
    group = group.reshape(-1)
    values = np.concatenate(
        [_weighted_aurocs(drawn[:, b : b + _CHUNK], group[correct_at], group[wrong], lo, lo + eq)
         for b in range(0, resamples, _CHUNK)]
    )  # fmt: skip
    low, high = np.percentile(values[np.isfinite(values)], [2.5, 97.5])
    return float(low), float(high)


_CHUNK = 64  # resamples at a time: (traces x 64) int32 blocks stay in cache


def draws(n_groups: int, resamples: int, seed: int = SEED) -> np.ndarray:
    """(n_groups, resamples) int32: how often each group is drawn in each resample of n_groups
    draws with replacement (uniform picks, counted)."""
    picks = np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups))  # (B, G)
    key = picks * resamples + np.arange(resamples)[:, None]  # (B, G): (group, resample), group-major
    return np.bincount(key.ravel(), minlength=n_groups * resamples).reshape(n_groups, resamples).astype(np.int32)


def _weighted_aurocs(drawn, correct_groups, wrong_groups, below, upto) -> np.ndarray:
    """The AUROC of each resample (a column of `drawn`, (G, b)) from the correct traces' groups
    in score order, the wrong traces' groups, and for each wrong trace the number of correct
    traces below its score (`below`) and at or below it (`upto`); NaN where a resample lacks
    a wrong or a correct trace."""
    cum = np.zeros((len(correct_groups) + 1, drawn.shape[1]), np.int32)  # (nc + 1, b)
    np.cumsum(drawn[correct_groups], axis=0, out=cum[1:])  # drawn correct traces below each position
    twice = cum[below]
    twice += cum[upto]  # (nw, b): 2 x (drawn correct below + half of those equal), per wrong trace
    w = drawn[wrong_groups]  # (nw, b): how often each wrong trace was drawn
    total = w.sum(0, dtype=np.float64) * cum[-1]  # (b,) wrong x correct pairs drawn
    num = np.einsum("ib,ib->b", w, twice, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, num / (2 * total), np.nan)


def summary(wrong, scores, resamples: int = RESAMPLES, groups=None) -> dict:
    """A ranked table's numbers for one score over some traces (NaN scores left out): n,
    n_wrong, auroc, its interval (auroc_low, auroc_high; resampling `groups`) and prr."""
    wrong, scores, groups = _clean(wrong, scores, groups)
    low, high = auroc_interval(wrong, scores, resamples, groups=groups)
    return {
        "n": len(scores),
        "n_wrong": int(wrong.sum()),
        "auroc": auroc(wrong, scores),
        "auroc_low": low,
        "auroc_high": high,
        "prr": prr(wrong, scores),
    }


def _rejection_area(correct: np.ndarray, risk: np.ndarray) -> float:
    """Mean over k = 1..n of the expected accuracy of the k least risky traces (ties: random order)."""
    order = np.argsort(risk, kind="stable")
    risk, correct = risk[order], correct[order].astype(np.float64)
    _, start, counts = np.unique(risk, return_index=True, return_counts=True)
    group_mean = np.add.reduceat(correct, start) / counts
    expected = np.repeat(group_mean, counts)  # each trace's expected correctness within its tie group
    kept = np.arange(1, len(risk) + 1)
    return float((np.cumsum(expected) / kept).mean())


def prr(wrong, scores) -> float:
    """Prediction-rejection ratio of risk scores `scores` for `wrong` (see the module docstring)."""
    wrong, scores, _ = _clean(wrong, scores)
    if not defined(wrong):
        return float("nan")
    correct = ~wrong
    random = correct.mean()
    oracle = _rejection_area(correct, wrong.astype(np.float64))
    return float((_rejection_area(correct, scores) - random) / (oracle - random))


def roc_curve(wrong, scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) as the threshold falls through the distinct risk
    scores, from (0, 0) to (1, 1); its trapezoid area is `auroc` (ties are diagonal steps)."""
    wrong, scores, _ = _clean(wrong, scores)
    if not defined(wrong):
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    values = np.unique(scores)[::-1]
    tp = np.searchsorted(np.sort(-scores[wrong]), -values, side="right")  # wrong traces with score >= threshold
    fp = np.searchsorted(np.sort(-scores[~wrong]), -values, side="right")
    fpr = np.concatenate([[0.0], fp / (~wrong).sum()])
    tpr = np.concatenate([[0.0], tp / wrong.sum()])
    return fpr, tpr
