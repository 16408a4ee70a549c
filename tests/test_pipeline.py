"""The job pipeline around `generate`: traces rendered from arrays (jsonrows, tracedoc), the
writer process's outputs, policy and failures, trace formats, and memory that does not grow with the
number of prompts."""

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from corevital import cli
from corevital.analysis import load_sweep
from corevital.output import jsonrows
from corevital.output.trace import Trace
from corevital.runner import jobs
from corevital.runner.app import run_job

from conftest import PROMPTS, compose, run_cli


@pytest.fixture(params=["c", "python"])
def interleave(request, monkeypatch):
    """Records copied by the compiled C kernel, and by the Python fallback used without a compiler."""
    if request.param == "python":
        monkeypatch.setattr(jsonrows, "_library", lambda: None)
    else:
        assert jsonrows.available(), "jsonrows.c did not compile"
    return request.param


# --- unit tier: JSON from arrays -----------------------------------------------------------
def test_numbers_are_float32_round_trips_and_non_finite_is_null(interleave):
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500),
            [0.0, -0.0, 1e-45, 3.4e38, np.nan, np.inf, -np.inf],
        ]
    ).astype(np.float32)
    m = jsonrows.Numbers(values.reshape(-1, 1))
    text = jsonrows.records([b"", b","], [m.take()], prefix=b"[", suffix=b"0]")
    parsed = json.loads(text)[:-1]
    finite = np.isfinite(values)
    assert [p is None for p in parsed] == list(~finite)
    assert np.array_equal(np.array([p for p in parsed if p is not None], dtype=np.float32), values[finite])


def test_records_interleave_keys_vectors_and_escaped_strings(interleave):
    texts = ["plain", 'a "quote", a comma', "new\nline", "ünï €", "\\back", ""]
    rows = (np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4) - 7) / 4
    rows[2, 1] = np.nan  # null inside a vector
    lits = [b'{"i":', b',"t":', b',"x":', b',"v":[', b'],"b":', b',"y":', b"},"]

    def entries():  # a template's takes consume their Numbers: each records call gets its own
        m, ints = jsonrows.Numbers(rows), jsonrows.Numbers(np.arange(len(texts)).reshape(-1, 1) * 1000)
        flags = jsonrows.pieces([b"false", b"true"], np.arange(len(texts)) % 2)
        return [ints.take(), jsonrows.strings(texts), m.take(), m.take(2), flags, m.take()]

    body = jsonrows.records(lits, entries(), prefix=b"[", suffix=b"{}]")
    column = jsonrows.record_column(lits, entries())
    want = [
        {
            "i": i * 1000,
            "t": t,
            "x": float(r[0]),
            "v": [None if np.isnan(v) else float(v) for v in r[1:3]],
            "b": bool(i % 2),
            "y": float(r[3]),
        }
        for i, (t, r) in enumerate(zip(texts, rows))
    ]
    assert json.loads(body) == [*want, {}]
    # as a column, each record ends where its own text, rendered alone, says it does
    alone = [
        len(json.dumps(w, separators=(",", ":"), ensure_ascii=False).replace("NaN", "null").encode()) + 1 for w in want
    ]
    assert column.ends.tolist() == np.cumsum(alone).tolist()
    assert column.starts.tolist() == [0, *np.cumsum(alone)[:-1].tolist()] and column.buf == body[1:-3]
    assert (
        jsonrows.records([b"", b";"], [jsonrows.pieces([b"false", b"true"], np.array([1, 0, 1]))])
        == b"true;false;true;"
    )


def test_records_copy_long_pieces_and_numbers_whole(interleave):
    """Pieces longer than the C copy's 16- and 32-byte moves, numbers longer than one SSE2
    load, and entries that end exactly where their buffer ends."""
    big = np.array([[-(10**18) - 7, 10**17], [123, -4], [2**62, 0]], np.int64)
    texts = ["x" * 100, "é" * 40 + '"', "short"]
    lits = [b'{"a_rather_long_key_that_is_longer_than_thirty_two_bytes":', b',"b":', b',"t":', b"}\n"]
    body = jsonrows.records(
        lits, [jsonrows.Numbers(big[:, :1]).take(), (n := jsonrows.Numbers(big[:, 1:])).take(), jsonrows.strings(texts)]
    )
    got = [json.loads(line) for line in body.decode().splitlines()]
    assert got == [
        {"a_rather_long_key_that_is_longer_than_thirty_two_bytes": int(r[0]), "b": int(r[1]), "t": t}
        for r, t in zip(big.tolist(), texts)
    ]
    assert n.taken == 1


def test_records_refuse_takes_that_do_not_cover_their_numbers(interleave):
    m = jsonrows.Numbers(np.ones((3, 3), np.float32))
    a, b = m.take(), m.take(2)
    with pytest.raises(ValueError, match="column 1 of its numbers where column 0"):
        jsonrows.records([b"", b"", b""], [b, a])
    with pytest.raises(ValueError, match="takes 1 of its numbers' 3 columns"):
        jsonrows.records([b"", b""], [a])
    with pytest.raises(ValueError, match="cannot take 1 more of 0"):
        m.take()
    with pytest.raises(ValueError, match="different lengths"):
        jsonrows.records([b"", b"", b""], [jsonrows.Numbers(np.ones((2, 1))).take(), jsonrows.strings(["a", "b", "c"])])


@pytest.fixture(scope="module")
def llama_job(tmp_path_factory, tiny_llama):
    """One job with two batches (one of 2 prompts, one of 1)."""
    d = tmp_path_factory.mktemp("pipeline")
    prompts = d / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = compose(
        [f"model.name_or_path={tiny_llama}", f"prompts={prompts}", "sampling.max_new_tokens=6", "batch_size=2"]
    )
    os.environ["COREVITAL_WRITER"] = "inline"  # written on the generating thread (see the writer-process test)
    try:
        return run_job(cfg, d / "job", "tiny")
    finally:
        del os.environ["COREVITAL_WRITER"]


def test_trace_json_carries_exactly_the_parquet_values(llama_job, tiny_llama, tmp_path, interleave):
    """Every JSON number equals the Parquet value as float32 (both written from the same
    capture arrays), with either way of copying records; the documents validate."""
    if interleave == "python":  # rerun the job so that the traces come from the fallback
        cfg = compose([f"model.name_or_path={tiny_llama}", "prompt=The quick brown fox", "sampling.max_new_tokens=6"])
        result = run_job(cfg, tmp_path / "job", "tiny")
    else:
        result = llama_job
    rows = pd.read_parquet(result.parquet_path)
    for path in result.trace_paths:
        doc = json.loads(Path(path).read_text())
        Trace.model_validate(doc)
        mine = rows[rows.trace_id == doc["trace_id"]].sort_values(["step_index", "layer_index"])
        assert len(mine) == len(doc["timeline"]) * doc["summary"]["num_layers"]
        flat = []
        for step in doc["timeline"]:
            ls = step["logits_summary"] or {}
            for layer in step["layers"]:
                h, a = layer["hidden_summary"] or {}, layer["attention_summary"] or {}
                flat.append(
                    {
                        "step_index": step["step_index"],
                        "layer_index": layer["layer_index"],
                        "token_id": step["token"]["token_id"],
                        "token_text": step["token"]["token_text"],
                        "is_prompt_token": step["token"]["is_prompt_token"],
                        "logits_entropy": ls.get("entropy"),
                        "logits_top1_prob": ls.get("top1_prob"),
                        "logits_top1_top2_margin": ls.get("top1_top2_margin"),
                        "token_logprob": ls.get("token_logprob"),
                        "hidden_mean": h.get("mean"),
                        "hidden_std": h.get("std"),
                        "hidden_l2_norm": h.get("l2_norm"),
                        "hidden_max_abs": h.get("max_abs"),
                        "attn_entropy_mean": a.get("entropy_mean"),
                        "attn_entropy_min": a.get("entropy_min"),
                        "attn_concentration_max": a.get("concentration_max"),
                        "hidden_sketch": h.get("sketch"),
                    }
                )
        expected = pd.DataFrame(flat)
        for column in expected.columns:
            got, want = mine[column].tolist(), expected[column].tolist()
            if column == "hidden_sketch":
                got = [None if g is None else np.asarray(g, np.float32).tolist() for g in got]
                want = [None if w is None else np.asarray(w, np.float32).tolist() for w in want]
            elif column.startswith(("logits", "token_logprob", "hidden", "attn")):
                got = [None if pd.isna(g) else float(np.float32(g)) for g in got]
                want = [None if pd.isna(w) else float(np.float32(w)) for w in want]
            assert got == want, column


@pytest.mark.parametrize("case", ["synthetic", "lens_probe_samples"])
def test_the_fast_trace_renderer_writes_the_plain_renderers_bytes(case, tiny_llama, tmp_path, interleave):
    """tracedoc.render (byte templates, C or Python record copying) writes exactly the bytes of
    tracedict.render_plain (one nested dict per step and layer, one orjson call): the plain
    renderer is the document's specification. Cases: a synthetic capture with NaN, +-Inf and
    0/-0 values, and real captures of a tiny Llama with the lens on every row, a linear probe
    (user metric, the `extensions` group) and two sampled continuations."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corevital.assess.probes import LinearProbe
    from corevital.capture import ModelFacts, generate_with_capture
    from corevital.core import metrics
    from corevital.core.config import SamplingConfig
    from corevital.output import tracedict, tracedoc
    from corevital.output.vocab import Vocabulary

    from synthetic import FakeTokenizer, clean_capture, header

    if case == "synthetic":
        cap = clean_capture()
        cap.values["hidden_mean"][3, 1:3] = [np.inf, -np.inf]
        cap.values["hidden_std"][4, :2] = [0.0, -0.0]
        cap.values["attn_entropy_mean"][5, 2] = np.nan
        caps, vocab = [cap], Vocabulary(FakeTokenizer(), 300)
    else:
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        size = model.config.hidden_size
        save_file({"weight": torch.randn(2, size), "bias": torch.randn(2)}, str(tmp_path / "p.safetensors"))
        probe = LinearProbe(str(tmp_path / "p.safetensors"), layer=1, name="truth")
        probe.bind(model)
        caps = generate_with_capture(
            model, tok, PROMPTS[:2], SamplingConfig(max_new_tokens=5), 4, num_samples=2, lens="all",
            extras=(probe, metrics.PerHead(model.config.num_attention_heads)), facts=ModelFacts.probe(model, "all"),
        )  # fmt: skip
        vocab = Vocabulary(tok, model.config.vocab_size)
    for i, cap in enumerate(caps):
        h = header(prompt_index=i, answer=["a <b>", "ü"] if i else None, grader="contains" if i else None)
        fast = tracedoc.render(cap, h, vocab, f'out {i} "q"').json
        plain = tracedict.render_plain(cap, h, vocab, f'out {i} "q"')
        assert fast == plain
        doc = json.loads(plain)
        assert len(doc["timeline"]) == len(cap.token_ids) and doc["timeline"][0]["logits_summary"] is None
        if case != "synthetic":
            assert doc["timeline"][-1]["layers"][1]["extensions"] is not None
            assert doc["timeline"][-1]["layers"][0]["lens_summary"] is not None
            heads = doc["timeline"][-1]["layers"][0]["attention_summary"]["heads"]  # metrics.per_head
            assert len(heads["entropy"]) == model.config.num_attention_heads
            assert doc["timeline"][0]["layers"][0]["attention_summary"] is None


def test_the_writer_process_writes_what_the_generating_thread_writes(llama_job, tiny_llama, tmp_path, monkeypatch):
    """The same job with the writer in a worker process (overlapped with generation, as beside
    a GPU) and on the generating thread (a CPU job whose torch threads pay): the same rows."""
    monkeypatch.setenv("COREVITAL_WRITER", "process")
    prompts = Path(llama_job.job_dir).parent / "p.txt"
    cfg = compose(
        [f"model.name_or_path={tiny_llama}", f"prompts={prompts}", "sampling.max_new_tokens=6", "batch_size=2"]
    )
    threaded = run_job(cfg, tmp_path / "threaded", "tiny")
    assert threaded.timings["writer"] == "process" and llama_job.timings["writer"] == "inline"
    a, b = (pd.read_parquet(r.parquet_path).drop(columns="trace_id") for r in (llama_job, threaded))
    pd.testing.assert_frame_equal(a, b)
    docs = [json.loads(Path(p).read_text()) for p in threaded.trace_paths]
    assert [d["generated"]["output_text"] for d in docs] == pd.read_parquet(
        tmp_path / "threaded" / "traces.parquet"
    ).output_text.tolist()


def test_job_outputs_are_whole_and_parts_are_gone(llama_job):
    job = llama_job.job_dir
    assert llama_job.traces == 3 and sorted(p.name for p in (job / "traces").iterdir()) == [
        f"prompt_{i:05d}.json" for i in range(3)
    ]
    assert not (job / "parts").exists() and not list(job.rglob(".*.tmp-*"))
    traces = pd.read_parquet(job / "traces.parquet")
    assert traces.prompt_index.tolist() == [0, 1, 2] and traces.trace_id.is_unique
    assert pq.read_metadata(job / "summaries.parquet").num_rows == llama_job.rows


# --- trace formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json.gz", "none"])
def test_trace_formats_are_read_by_validate_report_and_load_sweep(fmt, tiny_gpt2, prompt_file, tmp_path, capsys):
    cfg = compose(
        [
            f"model.name_or_path={tiny_gpt2}",
            f"prompts={prompt_file}",
            "sampling.max_new_tokens=3",
            f"traces.format={fmt}",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    tables = load_sweep(tmp_path / "job", table="traces")
    assert result.traces == 3 and len(tables) == 3
    files = sorted((tmp_path / "job" / "traces").glob("*")) if (tmp_path / "job" / "traces").exists() else []
    if fmt == "none":
        assert files == [] and cli.main(["validate", str(tmp_path / "job")]) == 1
        assert "no trace files" in capsys.readouterr().err
    else:
        assert [f.name for f in files] == [f"prompt_{i:05d}.json.gz" for i in range(3)]
        docs = [json.loads(gzip.decompress(f.read_bytes())) for f in files]
        assert [d["trace_id"] for d in docs] == tables.trace_id.tolist()
        assert cli.main(["validate", str(tmp_path / "job")]) == 0
        assert capsys.readouterr().out.count(": ok") == 3
    assert cli.main(["report", str(tmp_path / "job")]) == 0
    assert len(list((tmp_path / "job" / "report" / "data").glob("t*.js"))) == 3


# --- the writer fails the job promptly ---------------------------------------------------------
def _limited(limit_bytes: int):
    """A child process whose files may not grow past `limit_bytes` (a full disk, in effect)."""

    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return setup


@pytest.mark.parametrize("writer", ["process", "inline"])
def test_a_full_disk_fails_the_job_with_one_sentence_and_keeps_whole_traces(writer, tiny_llama, tmp_path):
    prompts = tmp_path / "many.txt"
    lines = PROMPTS * 20
    lines[30] = " ".join(["jumps over the lazy dog"] * 15)  # ~270 tokens: a trace far larger than the others
    prompts.write_text("\n".join(lines) + "\n")
    args = [
        f"model.name_or_path={tiny_llama}",
        f"prompts={prompts}",
        "sampling.max_new_tokens=8",
        "batch_size=4",
        "hydra.run.dir=out",
    ]
    # the other traces and the parts stay under 120 KB; prompt 30's trace does not fit
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COREVITAL_WRITER": writer}
    proc = subprocess.run(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limited(120_000),
        timeout=600,
    )
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("corevital: error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "could not write" in errors[0] and "a rerun resumes after them" in errors[0]
    status = json.loads((out / jobs.STATUS).read_text())
    assert status["status"] == "failed" and not (out / jobs.DONE).exists()
    assert not list(out.rglob(".*.tmp-*")), "nothing half-written is left"
    assert not (out / "summaries.parquet").exists() and not (out / "traces.parquet").exists()
    kept = sorted((out / "traces").glob("*.json"))
    assert 0 < len(kept) <= 30
    for p in kept:
        json.loads(p.read_text())  # every trace under its final name is whole
    committed = sum(pq.read_metadata(p).num_rows for p in (out / "parts").glob("*.traces.parquet"))
    assert f"the {committed} trace(s) finished before it are kept" in errors[0]

    assert json.loads((out / jobs.STATUS).read_text())["status"] == "failed"
    rerun = run_cli(args, cwd=tmp_path, env={"COREVITAL_WRITER": writer})  # room again: the rerun completes the job
    assert rerun.returncode == 0, rerun.stderr
    traces = pd.read_parquet(out / "traces.parquet")
    assert traces.prompt_index.tolist() == list(range(60)) and traces.trace_id.is_unique


# --- memory ----------------------------------------------------------------------------------
def _peak_rss_mib(args: list[str], cwd: Path, writer: str) -> float:
    """A job process's peak resident set size plus its writer process's (their VmHWM, read until
    they exit; pages the two share count twice). ru_maxrss would include this test process's
    own pages, which survive fork and exec."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COREVITAL_WRITER": writer},
    )
    peaks: dict[int, float] = {}  # the job's and its writer process's
    seen: dict[int, int] = {}  # samples each process was seen in as a Python process
    while proc.poll() is None:
        for pid in (proc.pid, *_children(proc.pid)):
            try:
                if os.readlink(f"/proc/{pid}/exe") != os.readlink(f"/proc/{proc.pid}/exe"):
                    continue  # a child that exec'd something else (a compiler): not the writer
                status = Path(f"/proc/{pid}/status").read_text()
                peaks[pid] = max(peaks.get(pid, 0.0), int(status.split("VmHWM:")[1].split()[0]) / 1024)
                seen[pid] = seen.get(pid, 0) + 1
            except (OSError, IndexError):
                pass
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    # a child seen once or twice is a fork about to exec: its copy of the job's high-water mark is not memory
    return sum(peak for pid, peak in peaks.items() if pid == proc.pid or seen[pid] > 2)


@pytest.mark.parametrize("writer", ["process", "inline"])
def test_peak_memory_does_not_grow_with_the_number_of_prompts(writer, tmp_path_factory, tmp_path):
    """A 48-layer model makes about 1,000 rows per prompt: 5x the prompts would hold ~60 MiB more
    if a job (or its writer process) kept its rows (about 375 bytes each before the writer
    streamed them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import save_tiny

    deep = save_tiny(
        tmp_path_factory,
        "deep-llama",
        LlamaConfig,
        LlamaForCausalLM,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    peaks = {}
    for n in (40, 200):
        prompts = tmp_path / f"{n}.txt"
        prompts.write_text("\n".join((PROMPTS * n)[:n]) + "\n")
        peaks[n] = _peak_rss_mib(
            [
                f"model.name_or_path={deep}",
                f"prompts={prompts}",
                "sampling.max_new_tokens=16",
                "batch_size=8",
                "sampling=greedy",
                "traces.format=none",
                f"hydra.run.dir=out{n}",
            ],
            tmp_path,
            writer,
        )
    rows = pq.read_metadata(tmp_path / "out200" / "summaries.parquet").num_rows
    assert rows > 200 * 48 * 16
    assert peaks[200] - peaks[40] < 20, (peaks, rows)  # retained rows would add (rows * 4/5) * ~375 bytes


# --- where the writer runs --------------------------------------------------------------------
def test_writer_mode_follows_the_policy(monkeypatch):
    """writer.writer_mode: one batch inline; an accelerator or a free core: a process; a
    launcher's share inline; torch's default threads: a process only where the writer's share
    is large enough to time the threads and the last one does not pay."""
    import torch

    from corevital.runner import threads
    from corevital.runner.placement import asks_threads, writer_mode

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for name in ("COREVITAL_WRITER", threads.ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    asked = []

    def spare(answer):
        return lambda share: asked.append(answer) or answer

    assert writer_mode(gpu, 1, False, 1.0, spare(True)) == "inline"
    assert writer_mode(gpu, 2, False, 0.0, spare(False)) == "process"
    assert writer_mode(cpu, 9, False, 0.01, spare(True)) == "inline" and asked == [], (
        "a small share is not worth timing"
    )
    assert writer_mode(cpu, 9, True, 0.5, spare(True)) == "inline" and asked == [], "a chosen thread count stands"
    assert writer_mode(cpu, 9, False, 0.5, spare(False)) == "inline" and asked == [False]
    assert writer_mode(cpu, 9, False, 0.5, spare(True)) == "process" and asked == [False, True]
    assert asks_threads(cpu, 9, False), "the first batch is generated under a StepTrial only here"
    assert not asks_threads(cpu, 9, True) and not asks_threads(gpu, 9, False) and not asks_threads(cpu, 1, False)
    monkeypatch.setattr(threads, "cores", lambda: 8)  # torch leaves cores free
    assert writer_mode(cpu, 9, True, 0.0, spare(False)) == "process"
    monkeypatch.setenv(threads.ENV, "4")  # under a launcher's share the other cores are other jobs'
    assert writer_mode(cpu, 9, True, 0.5, spare(True)) == "inline"
    monkeypatch.setenv("COREVITAL_WRITER", "process")
    assert writer_mode(cpu, 1, True, 0.0, spare(False)) == "process"


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores")
def test_step_trial_hands_over_a_thread_only_when_it_saves_less_than_the_writer_would():
    """threads.StepTrial, called after each step of a fake generation: the thread count
    alternates between all and one fewer from step to step; on steps whose time does not
    depend on torch's threads it gives one up, on steps that run 1/threads as long it keeps
    them (unless the writer's share is larger still); too few steps keep them all; a writer's
    share too small to matter ends the trial after the first decode step."""
    import torch

    from corevital.runner import threads

    def generation(trial, steps, seconds):
        seen = []
        for _ in range(steps):
            time.sleep(seconds())
            trial()
            seen.append(torch.get_num_threads())
        trial.end()
        return seen

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        trial = threads.StepTrial()
        seen = generation(trial, 12, lambda: 0.02)
        assert seen == [1, 2] * 6 and torch.get_num_threads() == 2
        assert trial.spare(0.1) is True and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        halves = lambda: 0.04 / torch.get_num_threads()  # noqa: E731 -- the second thread saves 50%
        trial = threads.StepTrial()
        generation(trial, 12, halves)
        assert [len(v) for v in trial.steps.values()] == [5, 5], (
            "the prefill's token and the first decode step are not timed"
        )
        assert trial.spare(0.1) is False and torch.get_num_threads() == 2
        assert trial.spare(0.9) is True and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        short = threads.StepTrial()
        generation(short, 6, lambda: 0.02)
        assert not short.enough() and short.spare(0.9) is False and torch.get_num_threads() == 2
        small = threads.StepTrial(writer_s_per_step=0.02 * threads.SPARE / 4)  # a writer's share below SPARE / 2
        assert generation(small, 8, lambda: 0.02) == [1] + [2] * 7, "the first decode step ends the trial"
        assert small.stopped and not small.enough()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores")
@pytest.mark.parametrize("new_tokens", [12, 3])
def test_a_job_times_torch_threads_on_its_first_batch(tiny_llama, prompt_file, tmp_path, monkeypatch, new_tokens):
    """A CPU job with torch's default threads and a writer share worth timing (COST_PER_ROW
    raised so that it is): the first batch's decode steps alternate the thread count; a first
    batch too short to decide (3 tokens) is generated once more for enough steps. The writer
    then takes a core only where the last thread saved less than its share (here always, the
    share being huge), and every trace is whole."""
    import torch

    from corevital.runner import app as run
    from corevital.runner import threads

    for name in ("COREVITAL_WRITER", threads.ENV, "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(run, "COST_PER_ROW", 1.0)
    seen, real = [], threads.StepTrial.__call__

    def watched(trial):
        real(trial)
        seen.append(torch.get_num_threads())

    monkeypatch.setattr(threads.StepTrial, "__call__", watched)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = run_job(
            compose(
                [
                    f"model.name_or_path={tiny_llama}",
                    f"prompts={prompt_file}",
                    "device=cpu",
                    "batch_size=2",
                    "sampling=greedy",
                    f"sampling.max_new_tokens={new_tokens}",
                ]
            ),
            tmp_path / "job",
            "tiny",
        )
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    first = min(new_tokens, len(seen))
    assert seen[:first] == [1, 2] * (first // 2) + [1] * (first % 2), "one call per token, alternating"
    if new_tokens < 2 * threads.MIN_STEPS + 2:
        assert seen[first : first + 4] == [1, 2, 1, 2], "the first batch again, longer, under a fresh trial"
    assert result.timings["writer"] == "process" and result.timings["torch_threads"] == threads_after == 1
    assert result.traces == len(PROMPTS)
    assert pd.read_parquet(tmp_path / "job" / "traces.parquet").prompt_index.tolist() == list(range(len(PROMPTS)))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _job_with_writer_process(tiny_llama, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 30) + "\n")
    args = [
        f"model.name_or_path={tiny_llama}",
        f"prompts={prompts}",
        "sampling.max_new_tokens=24",
        "batch_size=3",
        "hydra.run.dir=out",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COREVITAL_WRITER": "process"},
    )
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "out" / "traces").glob("*.json"))) < 6:
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended too soon"
        time.sleep(0.01)
    writers = _children(proc.pid)
    assert len(writers) == 1, "one writer process"
    return proc, writers[0], args


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_writer_process_that_dies_fails_the_job_with_one_sentence(tiny_llama, tmp_path):
    proc, writer, args = _job_with_writer_process(tiny_llama, tmp_path)
    os.kill(writer, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("corevital: error:")]
    assert len(errors) == 1 and "the writer process ended unexpectedly" in errors[0] and "Traceback" not in stderr
    out = tmp_path / "out"
    assert json.loads((out / jobs.STATUS).read_text())["status"] == "failed"
    assert not (out / "summaries.parquet").exists()
    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert pd.read_parquet(out / "traces.parquet").prompt_index.tolist() == list(range(90))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_writer_process_dies_with_its_job(tiny_llama, tmp_path):
    """SIGKILL to the job alone (not its process group): its writer goes too, and the rerun
    holds every trace exactly once."""
    proc, writer, args = _job_with_writer_process(tiny_llama, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while _alive(writer):
        assert time.monotonic() < deadline, "the writer outlived its job"
        time.sleep(0.05)
    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    traces = pd.read_parquet(tmp_path / "out" / "traces.parquet")
    assert traces.prompt_index.tolist() == list(range(90)) and traces.trace_id.is_unique
    files = {json.loads(p.read_text())["trace_id"] for p in (tmp_path / "out" / "traces").glob("*.json")}
    assert files == set(traces.trace_id)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker is forked")
def test_background_worker_returns_its_result_and_reports_its_error(tmp_path):
    """background.Background alone: items handled in order in another process, close()'s
    result back (many times over, so that a child exiting right after its reply is met);
    an error as one sentence from put or finish, after which cleanup has run in the child."""
    from corevital.output import background

    out = tmp_path / "items.txt"

    def handle(item):
        if item == "bad":
            raise background.WorkerError("item bad cannot be written")
        with out.open("a") as f:
            f.write(f"{item} {os.getpid()}\n")

    for round_ in range(15):
        out.unlink(missing_ok=True)
        worker = background.Background(handle, lambda: out.read_text().split("\n")[0], lambda: None).start()
        for i in range(3):
            worker.put(i)
        first = worker.finish()
        lines = out.read_text().split()
        assert lines[::2] == ["0", "1", "2"] and first.startswith("0 ") and lines[1] != str(os.getpid()), round_

    cleaned = tmp_path / "cleaned"
    worker = background.Background(handle, lambda: None, lambda: cleaned.write_text("yes")).start()
    worker.put("bad")
    with pytest.raises(background.WorkerError, match="^item bad cannot be written$"):
        for i in range(100):  # the error surfaces at a later put, or at finish
            worker.put(i)
        worker.finish()
    assert worker.failed() and cleaned.read_text() == "yes"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker is forked")
def test_a_dead_worker_with_items_still_queued_does_not_hold_up_the_exit(tmp_path):
    """A worker killed while a large item is still being fed to it: the parent's put fails with
    one sentence and the parent process exits at once (its queue's feeder thread is not
    waited for)."""
    script = tmp_path / "dead.py"
    script.write_text("""
import os, signal, sys, time
from corevital.output import background
worker = background.Background(lambda item: time.sleep(60), lambda: None, lambda: None).start()
worker.put("first")  # the worker sleeps on it
time.sleep(0.5)
worker.put(b"x" * (32 << 20))  # far more than a pipe holds: the feeder thread blocks on it
os.kill(worker._process.pid, signal.SIGKILL)
worker._process.join(10)
try:
    worker.put("third")
except background.WorkerError as e:
    print("error:", e)
""")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert "error: the writer process ended unexpectedly (exit code -9)" in proc.stdout
    assert time.monotonic() - start < 20
