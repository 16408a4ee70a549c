"""Benchmark metrics.per_head: the same job with it off and on, interleaved, from process
start to exit (the embedded model, the first N questions of data/facts.jsonl, chat template,
16 sampled tokens, batch 8).

    .venv/bin/python scripts/bench_per_head.py [--prompts 200] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(prompts: Path, out: Path, per_head: bool) -> tuple[float, int]:
    cmd = [
        str(ROOT / "scripts/run"), f"prompts={prompts}", "chat_template=true", "sampling.max_new_tokens=16",
        "batch_size=8", f"metrics.per_head={str(per_head).lower()}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, (out / "summaries.parquet").stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "q.jsonl"
        lines = (ROOT / "data/facts.jsonl").read_text().splitlines()[: a.prompts]
        prompts.write_text("".join(json.dumps({"prompt": json.loads(x)["prompt"]}) + "\n" for x in lines))
        times: dict[bool, list[float]] = {False: [], True: []}
        sizes: dict[bool, int] = {}
        for rep in range(a.reps):
            for on in (False, True):
                wall, size = run(prompts, Path(tmp) / f"{on}-{rep}", on)
                times[on].append(wall)
                sizes[on] = size
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {a.prompts} prompts, {a.reps} reps")
    print(f"per_head=false: {off:.1f} s, summaries.parquet {sizes[False] / 1e6:.1f} MB")
    print(f"per_head=true:  {on:.1f} s ({on / off - 1:+.1%}), summaries.parquet {sizes[True] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
