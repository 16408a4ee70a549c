"""Known results, reproduced from CoreVital's own tables on the embedded model.

    .venv/bin/python scripts/known_results.py [--out docs/img/known_results.png]

Runs one job (10 factual questions from data/facts.jsonl, chat template, greedy, 24 new
tokens, `metrics.logit_lens=all`) and plots, per layer, from `summaries.parquet`:
1. the attention sink (Xiao et al. 2024): the mean weight on the first token (`attn_sink_mass`);
2. massive activations (Sun et al. 2024): `hidden_max_abs` at the first position against
   its median over the other positions;
3. the logit lens (nostalgebraist 2020): how often the lens's top token is the model's
   (`lens_top1_match`), and `lens_kl`.
Prints the per-layer figures the README quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def run_job(job: Path, prompts: Path) -> pd.DataFrame:
    """One CoreVital job into `job`; its summaries.parquet."""
    args = [
        sys.executable,
        "-m",
        "corevital.runner.app",
        f"prompts={prompts}",
        "chat_template=true",
        "sampling=greedy",
        "sampling.max_new_tokens=24",
        "batch_size=5",
        "metrics.logit_lens=all",
        "traces.format=none",
        f"hydra.run.dir={job}",
    ]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
    return pd.read_parquet(job / "summaries.parquet")


def per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """The three results, one row per layer."""
    rows = df[df.step_index > 0]
    first = rows[rows.step_index == 1].groupby("layer_index").hidden_max_abs.median()  # position 0
    rest = rows[rows.step_index > 1].groupby("layer_index").hidden_max_abs.median()
    return pd.DataFrame(
        {
            "sink_mass_prompt": rows[rows.is_prompt_token & (rows.step_index > 1)]
            .groupby("layer_index")
            .attn_sink_mass.mean(),
            "sink_mass_generated": rows[~rows.is_prompt_token].groupby("layer_index").attn_sink_mass.mean(),
            "max_abs_first": first,
            "max_abs_other_median": rest,
            "lens_top1_match": rows.groupby("layer_index").lens_top1_match.mean(),
            "lens_kl": rows.groupby("layer_index").lens_kl.mean(),
        }
    )


def plot(table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(table.index, table.sink_mass_prompt, label="prompt rows")
    ax[0].plot(table.index, table.sink_mass_generated, label="generated rows")
    ax[0].set(title="Attention sink: weight on the first token", xlabel="layer", ylabel="mean over heads")
    ax[0].legend()
    ax[1].semilogy(table.index, table.max_abs_first, label="first position")
    ax[1].semilogy(table.index, table.max_abs_other_median, label="other positions (median)")
    ax[1].set(title="Massive activations: max |hidden|", xlabel="layer")
    ax[1].legend()
    ax[2].plot(table.index, table.lens_top1_match, label="top-1 = model's")
    twin = ax[2].twinx()
    twin.plot(table.index, table.lens_kl, color="tab:red", label="KL (nats)")
    ax[2].set(title="Logit lens converging with depth", xlabel="layer", ylabel="top-1 match rate")
    twin.set_ylabel("KL(model || lens), nats", color="tab:red")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "known_results.png"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="corevital-known-") as tmp:
        prompts = Path(tmp) / "questions.jsonl"
        lines = (ROOT / "data" / "facts.jsonl").read_text(encoding="utf-8").splitlines()[:10]
        prompts.write_text(
            "\n".join(json.dumps({"prompt": json.loads(x)["prompt"]}) for x in lines) + "\n", encoding="utf-8"
        )
        table = per_layer(run_job(Path(tmp) / "job", prompts))
    plot(table, Path(a.out))
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
