"""Benchmark `corevital view` as a user meets it: whole pages in headless Chromium over a sweep of
more than 10 million (row x layer) rows, the server a separate `corevital view` process.

    .venv/bin/python scripts/bench_view.py [--dir /tmp/cv-bench-view] [--reps 3]

The sweep (written once, then reused) is made by the job's own writer from synthetic captures
(tests/synthetic.py): 40 jobs of 2,500 short traces (10 tokens x 10 layers: 10 million rows,
100,000 traces, `traces.format=none`) and one job of 20 long traces (1,000 tokens x 32 layers,
JSON traces). Timed, each from the request to what the user sees, median of --reps:

    sweep page    goto(/) until the first trace row is shown
    scroll        the list scrolled to its middle until the rows there are shown
    search        text typed in the search box until the count is updated
    sort          a column header clicked until the first row is the new first
    trace page    goto(#/trace/<long trace>) until its 1,000 tokens and the heatmap are shown
    token         a token clicked until its details (32 layer rows) are shown

and the server's peak RSS (VmHWM) at the end. Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def write_job(job_dir: Path, traces: int, P: int, G: int, L: int, fmt: str, seed: int, model: str) -> None:
    """One job dir written by the job's writer from synthetic captures."""
    from corevital.output.sinks import Delivery
    from corevital.output.vocab import Vocabulary
    from corevital.output.writer import Batch, JobWriter, Store

    from synthetic import FakeTokenizer, clean_capture, header

    store = Store(job_dir)
    store.prepare(f"bench-{model}-{seed}", resume=False)
    size = max(300, P + G)
    vocab = Vocabulary(FakeTokenizer(), size)
    config = {"seed": seed, "num_samples": 1}
    batch = 50
    with JobWriter(store, fmt, Delivery([]), vocab, config, traces, "inline") as writer:
        for start in range(0, traces, batch):
            caps, headers = [], []
            for i in range(start, min(traces, start + batch)):
                caps.append(clean_capture(P=P, G=G, L=L, seed=seed * 100_000 + i, vocab=size))
                h = header(prompt_index=i, model=model, seed=seed, trace_id=f"{model}-{seed}-{i:06d}")
                text = f"question {i}: what is {i % 97} + {i % 89}? {'hard ' * (i % 3)}"
                headers.append(dataclasses.replace(h, prompt=dataclasses.replace(h.prompt, text=text)))
            writer.put(Batch(start, caps, headers))
        writer.finish()
    store.remove()
    (job_dir / "status.json").write_text(json.dumps({"status": "done"}))


def make_sweep(root: Path) -> None:
    if (root / "done").is_file():
        return
    t = time.perf_counter()
    for j in range(40):
        write_job(root / f"short/seed={j}", 2500, 6, 4, 10, "none", j, f"model-{j % 4}")
        print(f"job {j + 1}/40 written ({time.perf_counter() - t:.0f} s)", flush=True)
    write_job(root / "long/seed=0", 20, 500, 500, 32, "json", 0, "long-model")
    (root / "done").write_text("")
    print(f"sweep written in {time.perf_counter() - t:.0f} s", flush=True)


def rows_in(root: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in root.rglob("summaries.parquet"))


def peak_rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text)[1]) / 1024


def measure(root: Path, reps: int) -> dict:
    from playwright.sync_api import expect, sync_playwright

    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "corevital.cli", "view", str(root), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    line = server.stdout.readline().strip()
    started = time.perf_counter() - t0
    url = re.search(r"(http://\S+)", line)[1]
    times: dict[str, list[float]] = {k: [] for k in ("sweep", "scroll", "search", "sort", "trace", "token")}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            for rep in range(reps):
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                t = time.perf_counter()
                page.goto(url)
                page.get_by_test_id("trace-row").first.wait_for()
                times["sweep"].append(time.perf_counter() - t)
                count = page.get_by_test_id("trace-count").inner_text()
                t = time.perf_counter()
                page.get_by_test_id("trace-list").evaluate("e => { e.scrollTop = e.scrollHeight / 2 }")
                page.locator('[data-testid=trace-row][data-trace-id$="-001250"]').first.wait_for()
                times["scroll"].append(time.perf_counter() - t)
                t = time.perf_counter()
                page.get_by_test_id("search").fill(f"question {1234 + rep}:")
                expect(page.get_by_test_id("trace-count")).to_have_text("40", timeout=10_000)
                times["search"].append(time.perf_counter() - t)
                page.get_by_test_id("search").fill("")
                expect(page.get_by_test_id("trace-count")).to_have_text(count, timeout=10_000)
                t = time.perf_counter()
                page.locator('[data-sort="rauq_head_mean"]').click()
                expect(page.locator('[data-sort="rauq_head_mean"]')).to_have_class(re.compile("sorted"))
                page.get_by_test_id("trace-row").first.wait_for()
                times["sort"].append(time.perf_counter() - t)
                t = time.perf_counter()
                page.goto(url + f"#/trace/long-model-0-{rep:06d}")
                expect(page.get_by_test_id("token")).to_have_count(1000, timeout=10_000)
                page.get_by_test_id("heatmap").wait_for()
                times["trace"].append(time.perf_counter() - t)
                t = time.perf_counter()
                page.locator('[data-testid=token][data-step="700"]').click()
                expect(page.get_by_test_id("layer-row")).to_have_count(32)
                times["token"].append(time.perf_counter() - t)
                page.context.close()
            browser.close()
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "rows": rows_in(root),
        "traces": count,
        "server_start_s": round(started, 2),
        **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()},
        **{f"{k}_all": [round(x, 3) for x in v] for k, v in times.items()},
        "server_peak_rss_mib": round(rss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/cv-bench-view")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    root = Path(a.dir)
    make_sweep(root)
    print(json.dumps(measure(root, a.reps), indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
