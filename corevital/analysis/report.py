"""Report: plots of a job or a sweep, and one self-contained HTML page with them.

    python -m corevital.analysis.report <job-or-sweep-dir> [--max-traces 12]

writes `<dir>/report.html` (every image embedded, so the file can be mailed or archived on
its own) and the same images as PNG files in `<dir>/plots/`:

- per trace: a layer x step heatmap of `attn_entropy_mean` and of `hidden_l2_norm`, and
  `logits_entropy` and `token_logprob` over the tokens, token texts on the axis, the
  prompt/generated boundary marked;
- per sweep (a dir holding more than one job): each metric over the generated tokens, mean
  and spread (one standard deviation over the prompts) per step, one line per model and seed.

Reads only the Parquet tables (`analysis.load_sweep`); matplotlib is an optional extra
(`pip install corevital[report]`, installed by ./scripts/run and ./scripts/test).
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from corevital.analysis.plots import png as _png
from corevital.analysis.plots import pyplot as _pyplot
from corevital.analysis.tables import load_sweep, parquet_files
from corevital.core.files import atomic_write, atomic_write_text

HEATMAPS = ("attn_entropy_mean", "hidden_l2_norm")
LINES = ("logits_entropy", "token_logprob")
COLUMNS = [
    "trace_id",
    "model",
    "model_id",
    "seed",
    "prompt_source",
    "prompt_index",
    "sample_index",
    "step_index",
    "layer_index",
    "is_prompt_token",
    "token_text",
    *LINES,
    *HEATMAPS,
]
MAX_TICKS = 60  # token labels on one axis; longer traces label every k-th token


def trace_figures(rows: pd.DataFrame) -> dict[str, bytes]:
    """One trace's rows (all steps and layers) -> {"heatmaps": png, "tokens": png}."""
    plt = _pyplot()
    steps = rows.pivot(index="layer_index", columns="step_index", values=list(HEATMAPS))  # (L, T) per metric
    T = rows.step_index.nunique()
    prompt_len = int(rows.loc[rows.is_prompt_token, "step_index"].max()) + 1
    boundary = prompt_len - 0.5  # between the last prompt token and the first generated one

    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 1, figsize=(min(18, 4 + T * 0.12), 7), sharex=True)
    for ax, metric in zip(axes, HEATMAPS):
        values = steps[metric].to_numpy(dtype=float)  # (L, T), NaN on step 0
        # norms span orders of magnitude (the first position's often dwarfs the rest): log colours
        log = metric == "hidden_l2_norm" and np.nanmin(values, initial=np.inf) > 0
        im = ax.imshow(
            values,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            interpolation="nearest",
            norm=LogNorm() if log else None,
        )
        ax.axvline(boundary, color="red", lw=1.2)
        ax.set_ylabel("layer")
        ax.set_title(metric + (" (log colour scale)" if log else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[-1].set_xlabel("step (token position); red line: end of prompt")
    heat = _png(fig)

    first = rows[rows.layer_index == rows.layer_index.min()].sort_values("step_index")  # one row per step
    fig, axes = plt.subplots(2, 1, figsize=(min(18, 4 + T * 0.18), 6), sharex=True)
    for ax, metric in zip(axes, LINES):
        ax.plot(first.step_index, first[metric].astype(float), marker=".", lw=1)
        ax.axvline(boundary, color="red", lw=1.2)
        ax.axvspan(boundary, first.step_index.max() + 0.5, color="orange", alpha=0.08)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    every = max(1, -(-T // MAX_TICKS))
    ticks = first.step_index.to_numpy()[::every]
    axes[-1].set_xticks(
        ticks, [repr(str(t))[1:-1][:12] for t in first.token_text.to_numpy()[::every]], rotation=90, fontsize=7
    )
    axes[0].set_title("next-token distribution per token (shaded: generated)")
    return {"heatmaps": heat, "tokens": _png(fig)}


def sweep_figure(df: pd.DataFrame) -> bytes:
    """Each metric over the generated tokens: mean and spread per step, per (model, seed)."""
    plt = _pyplot()
    gen = df[~df.is_prompt_token].copy()
    gen["gen_step"] = gen.step_index - gen.groupby("trace_id", observed=True).step_index.transform("min")
    metrics = [*LINES, *HEATMAPS]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3 * len(metrics)), sharex=True)
    for (model, seed), group in gen.groupby(["model_id", "seed"], observed=True):
        per_trace = group.groupby(["trace_id", "gen_step"], observed=True)[metrics].mean()  # layers averaged
        stats = per_trace.groupby("gen_step").agg(["mean", "std"])
        label = f"{Path(str(model)).name} seed={seed}"
        for ax, metric in zip(axes, metrics):
            mean, std = stats[(metric, "mean")], stats[(metric, "std")].fillna(0)
            (line,) = ax.plot(stats.index, mean, lw=1.3, label=label)
            ax.fill_between(stats.index, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for ax, metric in zip(axes, metrics):
        ax.set_ylabel(metric + (" (mean over layers)" if metric in HEATMAPS else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title("generated tokens: mean over prompts (line) +- one standard deviation (band)")
    axes[-1].set_xlabel("generated token")
    return _png(fig)


def _label(rows: pd.DataFrame, samples: bool = False) -> str:
    """A trace's caption; `samples`: the runs drew several continuations per prompt (num_samples)."""
    r = rows.iloc[0]
    sample = f" sample {int(r.sample_index)}" if samples and pd.notna(r.sample_index) else ""
    return f"{Path(str(r.model_id)).name}, seed {r.seed}, {r.prompt_source} #{r.prompt_index}{sample}"


def build(path: str | Path, max_traces: int = 12) -> Path:
    """Write `<path>/report.html` and `<path>/plots/*.png`; returns the HTML file's path."""
    root = Path(path)
    df = load_sweep(root, columns=COLUMNS)
    traces = df.trace_id.unique()
    order = (
        df.drop_duplicates("trace_id")
        .sort_values(["model_id", "seed", "prompt_source", "prompt_index", "sample_index"])
        .trace_id
    )
    samples = bool((df.sample_index.fillna(0) > 0).any())  # null in tables written before num_samples
    images: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    if len(parquet_files(root)) > 1:
        images.append(("sweep.png", f"All {len(traces)} traces compared across models and seeds", sweep_figure(df)))
    for i, trace_id in enumerate(list(order)[:max_traces]):
        rows = df[df.trace_id == trace_id]
        for kind, png in trace_figures(rows).items():
            images.append((f"trace_{i:03d}_{kind}.png", f"{_label(rows, samples)}: {kind}", png))
    for old in (root / "plots").glob("*.png"):  # an earlier report's, e.g. of more traces
        old.unlink()
    for name, _, png in images:
        atomic_write(root / "plots" / name, lambda tmp, data=png: tmp.write_bytes(data))
    out = root / "report.html"
    atomic_write_text(out, _html(root, len(traces), min(len(traces), max_traces), images))
    return out


def _html(root: Path, n_traces: int, shown: int, images: list[tuple[str, str, bytes]]) -> str:
    body = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption, png in images
    )
    note = (
        ""
        if shown == n_traces
        else f"<p>Per-trace plots for the first {shown} of {n_traces} traces (--max-traces).</p>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>CoreVital report: {html.escape(str(root))}</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}figure{margin:2em 0}</style></head><body>"
        f"<h1>CoreVital report</h1><p>{html.escape(str(root.resolve()))}: {n_traces} "
        f"trace(s).</p>{note}{body}</body></html>"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corevital.analysis.report", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a job dir or a sweep dir")
    p.add_argument(
        "--max-traces", type=int, default=12, help="per-trace plots for at most this many traces (default 12)"
    )
    a = p.parse_args(argv)
    try:
        out = build(a.path, a.max_traces)
    except FileNotFoundError as e:
        print(
            f"corevital: error: {e}; give a job dir or a sweep dir (one with summaries.parquet files)", file=sys.stderr
        )
        return 2
    print(f"corevital: report: {out} (images also in {out.parent / 'plots'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
