"""Failure behaviour: the HTTP sink against real local servers, custom sinks, every bad input
(one sentence, non-zero exit, no traceback, no partial output), numerical overflow, pickle
refusal, secrets kept out of files, and Ctrl-C."""

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from corevital.core.config import ConfigError
from corevital.model.loader import ModelUnavailableError
from corevital.output.sinks import DeliveryError, HTTPSink
from corevital.output.tracedoc import TraceDoc
from corevital.runner import jobs
from corevital.runner.app import run_job

from conftest import PROMPTS, compose, run_cli, save_tiny

TOKEN = "s3cr3t-token-7f9a1c"


# --- a real HTTP server on localhost ---------------------------------------------------------
class Server:
    """Answers POSTs with `codes` in turn (then 200), optionally after `delay` s; records each request."""

    def __init__(self, codes=(), delay=0.0):
        self.codes, self.delay, self.requests = list(codes), delay, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                time.sleep(outer.delay)
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/traces"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _http(url, *extra):
    return ["sink=http", f"sink.url={url}", "sink.backoff_s=0.01", *extra]


def _closed_port_url() -> str:
    server = Server()
    url = server.url
    server.httpd.server_close()  # nothing listens there now
    return url


def test_http_sink_posts_gzipped_json_equal_to_the_local_trace_with_the_bearer_token(
    tiny_gpt2, prompt_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("COREVITAL_HTTP_TOKEN", TOKEN)
    with Server() as server:
        cfg = compose(
            [
                f"model.name_or_path={tiny_gpt2}",
                f"prompts={prompt_file}",
                "sampling.max_new_tokens=3",
                *_http(server.url),
            ]
        )
        result = run_job(cfg, tmp_path / "job", "tiny")
    assert len(server.requests) == 3 and result.undelivered == 0 and result.warnings == []
    for (headers, body), path in zip(server.requests, result.trace_paths):
        assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert json.loads(gzip.decompress(body)) == json.loads(Path(path).read_text())


def test_http_sink_retries_5xx_and_connection_errors_but_not_4xx():
    report = TraceDoc("x", 0, b'{"trace_id": "x"}')  # HTTPSink only sends what it is given
    with Server(codes=[503, 502]) as server:  # fails the first two requests, then accepts
        assert HTTPSink(server.url, retries=3, backoff_s=0.01).write(report) == server.url
        assert len(server.requests) == 3
    with Server(codes=[400]) as server:
        with pytest.raises(DeliveryError, match=r"refused the trace: HTTP 400 .*not retried"):
            HTTPSink(server.url, retries=3, backoff_s=0.01).write(report)
        assert len(server.requests) == 1
    with Server(codes=[500] * 10) as server:
        with pytest.raises(DeliveryError, match=r"after 3 attempt\(s\): HTTP 500"):
            HTTPSink(server.url, retries=2, backoff_s=0.01).write(report)
        assert len(server.requests) == 3
    with Server(delay=1.0) as server:  # slower than the timeout
        start = time.monotonic()
        with pytest.raises(DeliveryError, match=r"after 2 attempt\(s\): .*timed out"):
            HTTPSink(server.url, timeout_s=0.2, retries=1, backoff_s=0.01).write(report)
        assert time.monotonic() - start < 1.5
    with pytest.raises(DeliveryError, match=r"after 2 attempt\(s\): .*Connection refused"):
        HTTPSink(_closed_port_url(), retries=1, backoff_s=0.01).write(report)


class Redirecting:
    """Answers every POST with `code` and a Location on `target` (another local server); records each request."""

    def __init__(self, target: str, code: int = 302):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(dict(self.headers))
                self.send_response(code)
                self.send_header("Location", target)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/traces"

    __enter__, __exit__ = Server.__enter__, Server.__exit__


class Recording(Server):
    """Server that also records GETs (what urllib sends after following a 302)."""

    def __init__(self):
        super().__init__()
        outer, handler = self, self.httpd.RequestHandlerClass

        def do_GET(h):
            outer.requests.append((dict(h.headers), b""))
            h.send_response(200)
            h.end_headers()

        handler.do_GET = do_GET


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_with_the_token_and_the_trace_counts_undelivered(
    code, tiny_gpt2, prompt_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("COREVITAL_HTTP_TOKEN", TOKEN)
    with Recording() as other, Redirecting(other.url.replace("127.0.0.1", "localhost"), code) as first:
        cfg = compose(
            [
                f"model.name_or_path={tiny_gpt2}",
                f"prompts={prompt_file}",
                "sampling.max_new_tokens=3",
                *_http(first.url, "sink.retries=1"),
            ]
        )
        result = run_job(cfg, tmp_path / "job", "tiny")
    assert other.requests == [], "the second host must never be contacted, let alone see the token"
    assert (
        result.undelivered == 3 and f"HTTP {code}" in result.delivery_error and "not followed" in result.delivery_error
    )
    assert len(first.requests) == 2, "retried once, then given up (the later traces are not retried)"
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for h in first.requests)


def test_a_token_over_plain_http_to_another_host_is_refused_before_anything_runs(
    tiny_gpt2, prompt_file, tmp_path, monkeypatch
):
    url = "http://corevital-sink.invalid/traces"  # never contacted: refused before the model loads
    proc = run_cli(
        [f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", *_http(url), "hydra.run.dir=out"],
        cwd=tmp_path,
        env={"COREVITAL_HTTP_TOKEN": TOKEN},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "is plain http:// to another host" in proc.stderr and "sink.allow_plain_http=true" in proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "traces").exists()
    monkeypatch.setenv("COREVITAL_HTTP_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="plain http:// to another host"):
        HTTPSink(url)
    HTTPSink(url, allow_plain_http=True)  # the user's explicit choice
    HTTPSink(url, token_env=None)  # no token, nothing to leak
    HTTPSink("https://corevital-sink.invalid/traces")
    HTTPSink("http://localhost:9/traces"), HTTPSink("http://127.0.0.2:9/traces"), HTTPSink("http://[::1]:9/traces")


@pytest.mark.parametrize("writer", ["inline", "process"])
def test_server_down_fails_the_job_keeps_the_traces_and_never_writes_the_token(
    writer, tiny_gpt2, prompt_file, tmp_path
):
    """With the writer inline and in its worker process (whose delivery counts come back)."""
    url = _closed_port_url()
    env = {"COREVITAL_HTTP_TOKEN": TOKEN, "COREVITAL_WRITER": writer}
    proc = run_cli(
        [
            f"model.name_or_path={tiny_gpt2}",
            f"prompts={prompt_file}",
            "sampling.max_new_tokens=3",
            *_http(url),
            "hydra.run.dir=out",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "3 of 3 trace(s) could not be delivered" in proc.stderr and "Connection refused" in proc.stderr
    out = tmp_path / "out"
    status = json.loads((out / jobs.STATUS).read_text())
    assert (
        status["status"] == "failed" and "could not be delivered" in status["error"] and not (out / jobs.DONE).exists()
    )
    traces = [json.loads(p.read_text()) for p in sorted((out / "traces").glob("*.json"))]
    assert len(traces) == 3
    assert [w["code"] for t in traces for w in t["warnings"]] == ["delivery_failed"] * 3
    assert "gave up after an earlier trace" in traces[1]["warnings"][0]["message"], (
        "one trace's retries, not every trace's"
    )
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.name == "run.log" for p in written)
    for p in written:
        assert TOKEN.encode() not in p.read_bytes(), p
    assert TOKEN not in proc.stdout + proc.stderr


def test_required_false_turns_a_delivery_failure_into_a_warning(tiny_gpt2, prompt_file, tmp_path):
    proc = run_cli(
        [
            f"model.name_or_path={tiny_gpt2}",
            f"prompts={prompt_file}",
            "sampling.max_new_tokens=3",
            *_http(_closed_port_url(), "sink.required=false"),
            "hydra.run.dir=out",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads((tmp_path / "out" / jobs.STATUS).read_text())
    assert status["status"] == "done" and len(status["warnings"]) == 3
    assert "corevital: warning: prompt 0: could not deliver the trace" in proc.stderr


# --- custom sinks ---------------------------------------------------------------------------
def test_a_custom_sink_is_instantiated_from_config(tiny_gpt2, prompt_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = compose(
        [
            f"model.name_or_path={tiny_gpt2}",
            f"prompts={prompt_file}",
            "sampling.max_new_tokens=3",
            "sink._target_=example_sink.JsonLinesSink",
            f"+sink.params.path={tmp_path / 'all.jsonl'}",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    lines = [json.loads(l) for l in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert lines == [json.loads(Path(p).read_text()) for p in result.trace_paths]
    assert lines[0]["run_config"]["sink"]["custom"] == "example_sink.JsonLinesSink"
    bad = compose([f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", "sink._target_=example_sink.NotASink"])
    with pytest.raises(ConfigError, match="is not a corevital.output.sinks.Sink subclass"):
        run_job(bad, tmp_path / "bad", "tiny")


# --- bad input: one sentence, non-zero exit, no traceback, no partial output -------------------
def _bad_inputs(tmp: Path) -> list:
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp / "notjson.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    (tmp / "noprompt.jsonl").write_text('{"prompt": "ok"}\n\n{"text": "no prompt key"}\n')
    (tmp / "long.txt").write_text("the quick brown fox " * 200 + "\n")
    (tmp / "file").write_text("a file, not a directory\n")
    return [  # (overrides, what the one sentence must say)
        (["prompts=missing.txt"], "prompt file 'missing.txt' does not exist"),
        (["prompts=empty.txt"], "holds no prompts"),
        (["prompts=latin1.txt"], "is not UTF-8"),
        (["prompts=notjson.jsonl"], "notjson.jsonl:2: not valid JSON"),
        (["prompts=noprompt.jsonl"], 'noprompt.jsonl:3: needs a string field "prompt"'),
        (["prompt=' '"], "the prompt is empty"),
        (
            ["prompts=long.txt", "MODEL"],
            r"has \d+ tokens; with sampling.max_new_tokens=20 that is \d+, more than the model's context window of 512",
        ),
        (
            ["model.name_or_path=no-such-org/no-such-model"],
            "is not available: it is not in the local Hugging Face cache",
        ),
        (["model.name_or_path=/nonexistent/model.gguf"], "model path '/nonexistent/model.gguf' does not exist"),
        (["model.name_or_path=."], r"model '\.' could not be loaded from \."),  # a directory without a model
        (["sampling.max_new_tokens=0"], r"sampling.max_new_tokens must be >= 1 \(got 0\)"),
        (
            ["sampling.temperature=0"],
            r"sampling.temperature must be > 0 when sampling \(got 0.0\); use sampling=greedy",
        ),
        (["sampling.top_p=1.5"], r"sampling.top_p must be in \(0, 1\] \(got 1.5\)"),
        (["sampling.top_p=0"], r"sampling.top_p must be in \(0, 1\] \(got 0.0\)"),
        (["sampling.top_k=-1"], r"sampling.top_k must be >= 0 \(got -1\)"),
        (["batch_size=0"], r"batch_size must be >= 1 \(got 0\)"),
        (
            ["device=cuda", "MODEL"],
            "device=cuda was requested but CUDA is not available on this machine; use device=cpu",
        ),
        (["hydra.run.dir=file/out"], "cannot write the output dir"),
    ]


BAD_INPUT_IDS = [
    "missing-file",
    "empty-file",
    "not-utf8",
    "jsonl-not-json",
    "jsonl-no-prompt",
    "empty-prompt",
    "longer-than-context",
    "model-not-offline",
    "gguf-missing",
    "dir-without-model",
    "max-new-tokens",
    "temperature",
    "top-p-high",
    "top-p-zero",
    "top-k",
    "batch-size",
    "cuda-missing",
    "unwritable-output",
]


@pytest.mark.parametrize("case", range(len(BAD_INPUT_IDS)), ids=BAD_INPUT_IDS)
def test_bad_input_exits_non_zero_with_one_clear_sentence_and_no_partial_output(case, tiny_gpt2, tmp_path):
    if BAD_INPUT_IDS[case] == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, message = _bad_inputs(tmp_path)[case]
    args = [f"model.name_or_path={tiny_gpt2}" if a == "MODEL" else a for a in args]
    if not any(a.startswith("hydra.run.dir") for a in args):
        args.append("hydra.run.dir=out")
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("corevital: error: ")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out"
    for name in ("summaries.parquet", "traces.parquet", "traces", jobs.DONE):
        assert not (out / name).exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_cli(["prompts=missing.txt", "hydra.run.dir=out"], cwd=tmp_path, env={"COREVITAL_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "does not exist" in proc.stderr


# --- numerical trouble ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overflowing_llama(tmp_path_factory) -> str:
    """A tiny Llama whose block 1 MLP is scaled up so that its output overflows float16 (max 65504)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = save_tiny(
        tmp_path_factory,
        "overflow",
        LlamaConfig,
        LlamaForCausalLM,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    weights = load_file(f"{path}/model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] *= 1e6
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def test_finite_scores_keeps_sampling_alive_and_leaves_ruled_out_tokens_out():
    from corevital.capture import FiniteScores

    scores = torch.tensor([[float("nan"), float("inf"), float("-inf"), 1.5]])
    out = FiniteScores()(None, scores)
    assert out.tolist() == [[0.0, torch.finfo(torch.float32).max, float("-inf"), 1.5]]
    assert torch.softmax(out, -1)[0, 2] == 0 and torch.isfinite(torch.softmax(out, -1)).all()


@pytest.mark.parametrize("sampling", ["greedy", "default"])
def test_float16_overflow_is_written_as_nan_with_a_warning_naming_steps_and_layers(
    overflowing_llama, prompt_file, tmp_path, sampling
):
    from transformers import AutoModelForCausalLM

    cfg = compose(
        [
            f"model.name_or_path={overflowing_llama}",
            f"prompts={prompt_file}",
            "model.dtype=float16",
            f"sampling={sampling}",
            "sampling.max_new_tokens=4",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "overflow")  # does not crash, sampled or not
    df = pd.read_parquet(result.parquet_path)
    traces = [json.loads(Path(p).read_text()) for p in result.trace_paths]
    # Independent check: which (position, layer) outputs are non-finite in a plain float16 forward pass.
    model = AutoModelForCausalLM.from_pretrained(overflowing_llama, dtype=torch.float16).eval()
    for trace in traces:
        ids = torch.tensor([trace["prompt"]["token_ids"] + trace["generated"]["token_ids"]])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        bad = torch.stack([~torch.isfinite(h[0]).all(-1) for h in out.hidden_states[1:]], dim=1)[
            :-1
        ].numpy()  # (T-1, L)
        assert bad.any(), "the test model must overflow"
        rows = df[(df.trace_id == trace["trace_id"]) & (df.step_index > 0)].sort_values(["step_index", "layer_index"])
        nan = rows.hidden_l2_norm.isna().to_numpy().reshape(bad.shape)
        assert (nan == bad).all()
        assert not np.isinf(rows[["hidden_mean", "hidden_std", "hidden_l2_norm", "hidden_max_abs"]].to_numpy()).any()
        steps, layers = np.nonzero(bad)
        [warning] = [w for w in trace["warnings"] if w["code"] == "non_finite"]
        assert (
            f"layers {layers.min()}-{layers.max()}" in warning["message"]
            or f"layers {layers.min()}" in warning["message"]
        )
        assert "written as NaN" in warning["message"]
        assert trace["timeline"][1]["layers"][int(layers.max())]["hidden_summary"]["l2_norm"] is None  # null in JSON
    assert len(result.warnings) == len(traces)


# --- security ---------------------------------------------------------------------------------
def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    class Factory:
        def mktemp(self, name):
            p = tmp_path / name
            p.mkdir()
            return p

    from safetensors.torch import load_file

    path = save_tiny(Factory(), "pickled", GPT2Config, GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    weights = Path(path) / "model.safetensors"
    torch.save(load_file(weights), Path(path) / "pytorch_model.bin")  # the old pickle format
    weights.unlink()
    cfg = compose([f"model.name_or_path={path}", "sampling.max_new_tokens=2", "device=cpu"])
    with pytest.raises(
        ModelUnavailableError,
        match=r"pickle files \(pytorch_model.bin\), which can run arbitrary code .* model.allow_pickle=true",
    ):
        run_job(cfg, tmp_path / "refused", "pickled")
    assert compose([]).model.trust_remote_code is False and compose([]).model.allow_pickle is False
    allowed = run_job(
        compose([f"model.name_or_path={path}", "sampling.max_new_tokens=2", "model.allow_pickle=true"]),
        tmp_path / "allowed",
        "pickled",
    )
    assert allowed.rows > 0


def test_traces_and_records_never_hold_environment_variables(tiny_gpt2, prompt_file, tmp_path):
    canary = "canary-value-93e1b"
    proc = run_cli(
        [f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", "sampling.max_new_tokens=2", "hydra.run.dir=out"],
        cwd=tmp_path,
        env={"COREVITAL_CANARY": canary, "COREVITAL_HTTP_TOKEN": TOKEN},
    )
    assert proc.returncode == 0, proc.stderr
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            assert canary.encode() not in p.read_bytes() and TOKEN.encode() not in p.read_bytes(), p


# --- interrupts -------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["inline", "process"])
def test_ctrl_c_keeps_finished_traces_leaves_nothing_partial_and_says_interrupted(writer, tiny_llama, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 30) + "\n")
    out = tmp_path / "out"
    args = [f"model.name_or_path={tiny_llama}", f"prompts={prompts}", "sampling.max_new_tokens=24", "hydra.run.dir=out"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COREVITAL_WRITER": writer},
        stderr=subprocess.PIPE,
        text=True,
        # as a shell starts it: Ctrl-C's default action, whatever the test process inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while len(list((out / "traces").glob("*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "corevital: interrupted;" in stderr and "Traceback" not in stderr
    status = json.loads((out / jobs.STATUS).read_text())
    assert status["status"] == "interrupted"
    kept = sorted((out / "traces").glob("*.json"))
    assert 3 <= len(kept) < 90 and f"{len(kept)} whole trace(s) kept" in stderr
    for p in kept:
        json.loads(p.read_text())
    assert not list(out.rglob(".*.tmp-*"))
    for name in ("summaries.parquet", "traces.parquet", jobs.DONE):
        assert not (out / name).exists()
    committed = sum(pq.read_metadata(p).num_rows for p in (out / "parts").glob("*.traces.parquet"))
    assert committed == len(kept), "every trace file kept belongs to a committed batch"
    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert pq.read_table(out / "traces.parquet").column("prompt_index").to_pylist() == list(range(90))
