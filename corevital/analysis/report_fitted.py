"""The fitted part of evaluate's report (fitted.py): the detectors' table, AUROC by layer (layer
blame) and AUROC by horizon k, as text for the terminal and as HTML with one PNG figure."""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd

from corevital.analysis import features, plots
from corevital.analysis.detectors import DETECTORS
from corevital.analysis.fitted import POOLED, Fitted

HORIZON_SHOWN = 4  # signals drawn by k besides the detectors and the baselines: the best at k = all


def _f(x: float, digits: int) -> str:
    return "n/a" if not np.isfinite(x) else f"{round(x, digits) + 0.0:.{digits}f}"


def k_label(k: int) -> str:
    return "all" if k == 0 else str(k)


def detectors_text(fits: Fitted) -> str:
    lines = ["detectors (fitted to the labels, scored out of fold, folds grouped by question):"]
    lines.append(
        f"  {'detector':<22} {'model':<14} {'n':>6} {'wrong':>6}  {'AUROC':>5}  {'95% interval':<13}  {'PRR':>6}"
    )
    for r in fits.detectors.itertuples():
        lines.append(
            f"  {r.detector:<22} {r.model:<14} {r.n:6d} {r.n_wrong:6d}  {_f(r.auroc, 3):>5}  "
            f"{_f(r.auroc_low, 2)}-{_f(r.auroc_high, 2):<8}  {_f(r.prr, 3):>6}"
        )
    best = fits.layers.sort_values("auroc", ascending=False).groupby("model").head(1)
    for r in best.itertuples():
        lines.append(
            f"layer blame, model {r.model}: layer {r.layer_index} predicts best alone, AUROC {_f(r.auroc, 3)} "
            f"[{_f(r.auroc_low, 2)}, {_f(r.auroc_high, 2)}]"
        )
    return "\n".join(lines)


def horizon_shown(early: pd.DataFrame, baselines: list[str]) -> list[str]:
    """The rows of early.parquet drawn by k (pooled model): the detectors, the HORIZON_SHOWN best
    signals at k = all, and the baselines among the signals."""
    pooled = early[(early.model == POOLED) & (early.k == 0)].sort_values("auroc", ascending=False)
    names = [d.name for d in DETECTORS]
    signals = [s for s in pooled.signal if s not in names]
    return list(dict.fromkeys(names + signals[:HORIZON_SHOWN] + [b for b in baselines if b in set(signals)]))


def figure(fits: Fitted, baselines: list[str]) -> bytes:
    """Two panels: AUROC of each layer's probe with its interval, per model; AUROC by the first k
    generated tokens, for the detectors and the best signals."""
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for model, g in fits.layers.groupby("model", sort=True):
        g = g.sort_values("layer_index")
        left.plot(g.layer_index, g.auroc, marker="o", ms=3, label=f"model {model}")
        left.fill_between(g.layer_index, g.auroc_low, g.auroc_high, alpha=0.2)
    left.axhline(0.5, color="grey", lw=0.8)
    left.set_xlabel("layer")
    left.set_ylabel("out-of-fold AUROC of a probe on this layer alone")
    left.set_title("layer blame: which layer's summaries predict a wrong answer")
    if len(fits.layers):
        left.legend(fontsize=7)
    left.grid(alpha=0.3)
    early = fits.early[fits.early.model == POOLED]
    ks = list(features.HORIZONS)
    for name in horizon_shown(fits.early, baselines):
        g = early[early.signal == name].set_index("k").reindex(ks)
        style = "-" if name in {d.name for d in DETECTORS} else "--" if name in baselines else ":"
        right.plot(range(len(ks)), g.auroc.to_numpy(), style, marker="o", ms=3, label=name)
    right.set_xticks(range(len(ks)), [k_label(k) for k in ks])
    right.axhline(0.5, color="grey", lw=0.8)
    right.set_xlabel("first k generated tokens")
    right.set_ylabel("AUROC (detectors: out of fold)")
    right.set_title("failure horizon: how early a wrong answer shows")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    return plots.png(fig)


def html_section(fits: Fitted, baselines: list[str]) -> str:
    head = "".join(
        f"<th>{h}</th>" for h in ("detector", "model", "n", "n_wrong", "AUROC", "95% interval (by question)", "PRR")
    )
    body = "".join(
        f"<tr><td>{html.escape(r.detector)}</td><td>{html.escape(r.model)}</td><td>{r.n}</td><td>{r.n_wrong}</td>"
        f"<td>{_f(r.auroc, 3)}</td><td>{_f(r.auroc_low, 3)} - {_f(r.auroc_high, 3)}</td><td>{_f(r.prr, 3)}</td></tr>"
        for r in fits.detectors.itertuples()
    )
    png = base64.b64encode(figure(fits, baselines)).decode() if len(fits.layers) or len(fits.early) else ""
    img = f"<figure><img alt='AUROC by layer and by k' src='data:image/png;base64,{png}'></figure>" if png else ""
    return (
        "<h2>Fitted detectors (out of fold, folds grouped by question)</h2>"
        f"<table><tr>{head}</tr>{body}</table><h2>Layer blame and failure horizon</h2>{img}"
    )
