"""Benchmark `corevital evaluate` with its detectors on a sweep of about 10,000 traces.

    .venv/bin/python scripts/bench_evaluate.py SWEEP [--traces 10000] [--work DIR]

SWEEP is a labelled sweep (e.g. the one docs/evaluate.md measures). Its jobs are copied as
many times as it takes to reach --traces, each copy's trace ids and prompt sources renamed
(so every copy's questions are new questions to the folds and the bootstrap), and the whole
`corevital evaluate` process is timed from start to exit, with its peak RSS.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RENAMED = ("trace_id", "prompt_source")


def renamed(table: pa.Table, copy: int) -> pa.Table:
    for name in RENAMED:
        i = table.schema.get_field_index(name)
        column = pc.binary_join_element_wise(pa.scalar(f"c{copy}-"), table.column(name).cast(pa.string()), "")
        table = table.set_column(i, name, column.cast(table.schema.field(name).type))
    return table


def build(sweep: Path, work: Path, traces: int) -> int:
    jobs = sorted(p.parent for p in sweep.glob("*/traces.parquet"))
    per_copy = sum(pq.read_metadata(j / "traces.parquet").num_rows for j in jobs)
    copies = math.ceil(traces / per_copy)
    shutil.rmtree(work, ignore_errors=True)
    for c in range(copies):
        for i, job in enumerate(jobs):
            out = work / f"copy={c},job={i}"
            out.mkdir(parents=True)
            for name in ("traces.parquet", "summaries.parquet"):
                f = pq.ParquetFile(job / name)
                with pq.ParquetWriter(out / name, f.schema_arrow) as w:
                    for g in range(f.num_row_groups):
                        w.write_table(renamed(f.read_row_group(g), c))
    return copies * per_copy


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--traces", type=int, default=10000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/corevital-bench-evaluate"))
    a = ap.parse_args()
    n = build(a.sweep, a.work, a.traces)
    start = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/corevital"), "evaluate", str(a.work)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"corevital evaluate on {n} traces (detectors, layers, early included): {wall:.1f} s, "
        f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB, exit {os.waitstatus_to_exitcode(status)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
