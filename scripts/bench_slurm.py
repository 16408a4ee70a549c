"""A whole sweep through a real SLURM, side by side with the same sweep under Hydra's basic
launcher: wall time from command start to exit, as a user waits for it.

Starts the one-node test cluster of tests/slurm_cluster.py (root; Debian's slurm-wlm,
slurmdbd, munge and mariadb-server), runs `--jobs` jobs of the embedded SmolLM2 (16 prompts,
32 new tokens, batch 8) each way, alternating, `--reps` times, and prints the medians and the
split of one SLURM task's time from its status.json and sacct.

    .venv/bin/python scripts/bench_slurm.py --reps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slurm_cluster import Cluster  # noqa: E402

PROMPTS = [f"Write a short note about topic number {i}." for i in range(16)]


def sweep(args: list[str], env: dict, cwd: Path) -> float:
    clock = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "corevital.run", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    took = time.perf_counter() - clock
    if out.returncode != 0:
        raise SystemExit(f"sweep failed: {out.stderr[-2000:]}")
    return took


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--jobs", type=int, default=4)
    a = p.parse_args()
    why = Cluster.available()
    if why:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="cv-bench-slurm-"))
    prompts = work / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    seeds = ",".join(str(s) for s in range(1, a.jobs + 1))
    common = [f"prompts={prompts}", "sampling.max_new_tokens=32", "batch_size=8", "device=cpu", f"seed={seeds}"]
    slurm_args = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=2",
                  "hydra.launcher.mem_gb=4", "hydra.launcher.array_parallelism=1"]  # fmt: skip
    cluster = Cluster.start()
    times: dict[str, list[float]] = {"basic": [], "slurm": []}
    try:
        for rep in range(a.reps):
            for kind in ("basic", "slurm") if rep % 2 == 0 else ("slurm", "basic"):
                where = work / f"{kind}-{rep}"
                args = ["-m", *common, f"hydra.sweep.dir={where}", *(slurm_args if kind == "slurm" else [])]
                times[kind].append(sweep(args, cluster.env(), work))
                print(f"rep {rep} {kind}: {times[kind][-1]:.1f} s", flush=True)
        last = work / f"slurm-{a.reps - 1}"
        status = [json.loads(p.read_text()) for p in sorted(last.glob("*/status.json"))]
        array = status[0]["slurm"]["array_job_id"]
        spans = cluster.run("sacct", "-X", "-n", "-P", "-j", array, "-o", "JobID,Start,End,Elapsed")
    finally:
        cluster.stop()
    b, s = statistics.median(times["basic"]), statistics.median(times["slurm"])
    print(f"{a.jobs}-job sweep: basic launcher {b:.1f} s, SLURM array {s:.1f} s, ratio {s / b:.2f}x")
    for st in status[:1]:
        print("one task's timings:", st["timings"], "elapsed_s", st["elapsed_s"])
    print("sacct:\n" + spans)


if __name__ == "__main__":
    main()
