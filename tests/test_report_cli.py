"""`corevital report` (the viewer's bundle), progress bars, and the `corevital` command (run, validate, schema)."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from test_failures import Server

from corevital import cli
from corevital.runner.app import run_job

from conftest import compose


@pytest.fixture(scope="module")
def small_sweep(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    prompts = root / "prompts.txt"
    prompts.write_text("The quick brown fox\nAttention weights say\n")
    for seed in (1, 2):
        cfg = compose(
            [f"model.name_or_path={tiny_llama}", f"prompts={prompts}", "sampling.max_new_tokens=6", f"seed={seed}"]
        )
        run_job(cfg, root / "sweep" / f"seed={seed}", "tiny")
    return root / "sweep"


def test_report_is_the_viewers_bundle_of_the_first_traces(small_sweep, tmp_path, capsys):
    """`corevital report DIR` writes the viewer's static bundle of DIR's first traces to DIR/report/
    (docs/view.md); a dir with no traces is one sentence, exit 2."""
    assert cli.main(["report", str(small_sweep), "--max-traces", "3"]) == 0
    out = small_sweep / "report"
    assert f"wrote 3 trace(s) to {out / 'index.html'}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "data").iterdir()) == ["sweep.js", "t00000.js", "t00001.js", "t00002.js"]
    assert '<script src="data/sweep.js"></script>' in (out / "index.html").read_text()
    assert cli.main(["report", str(small_sweep / "seed=1"), "--out", str(tmp_path / "r")]) == 0
    assert len(list((tmp_path / "r" / "data").glob("t*.js"))) == 2
    (tmp_path / "nothing").mkdir()
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no traces.parquet under" in err


# --- progress ---------------------------------------------------------------------------------
def _run_on_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run the app with stdout and stderr on a pseudo-terminal; returns (exit status, what it printed)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=cwd,
        stdout=child,
        stderr=child,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"},
    )
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    return proc.wait(), out.decode(errors="replace")


def test_progress_bars_on_a_terminal_only_and_not_with_progress_false(tiny_gpt2, prompt_file, tmp_path):
    args = [f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", "sampling.max_new_tokens=70"]
    rc, shown = _run_on_terminal([*args, "hydra.run.dir=tty"], tmp_path)
    assert rc == 0, shown
    assert re.search(r"prompts: 100%\|.*\| 3/3", shown) and re.search(r"tokens: +\d+%", shown)
    assert shown.count("trace 3/3") == 1, "one log line per finished trace"
    rc, quiet = _run_on_terminal([*args, "hydra.run.dir=quiet", "progress=false"], tmp_path)
    assert rc == 0 and "prompts:" not in quiet and "%|" not in quiet
    piped = subprocess.run(
        [sys.executable, "-m", "corevital.run", *args, "hydra.run.dir=piped"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert piped.returncode == 0 and "%|" not in piped.stderr and "\r" not in piped.stderr


# --- the corevital command --------------------------------------------------------------------
def test_seed_flags_map_to_the_equivalent_overrides():
    a, _ = cli.parser().parse_known_args(
        [
            "run",
            "--model",
            "gpt2",
            "--prompt",
            "Hello, world: it's a=b",
            "--max_new_tokens",
            "50",
            "--device",
            "auto",
            "--seed",
            "42",
            "--temperature",
            "0.8",
            "--top_k",
            "50",
            "--top_p",
            "0.95",
            "--out",
            "res/t.json",
            "--remote_sink",
            "http",
            "--remote_url",
            "http://h:8000/x",
        ]
    )
    overrides, json_out = cli.run_overrides(a)
    assert overrides == [
        "model=gpt2",
        "prompt='Hello, world: it\\'s a=b'",
        "sampling.max_new_tokens=50",
        "sampling.temperature=0.8",
        "sampling.top_k=50",
        "sampling.top_p=0.95",
        "seed=42",
        "device=auto",
        "sink=http",
        "sink.url='http://h:8000/x'",
        "hydra.run.dir='res/t.corevital'",
    ]
    assert json_out == Path("res/t.json")
    assert cli.model_override("/models/my-llama") == "model.name_or_path='/models/my-llama'"


def _corevital(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("corevital")
    assert exe.is_file(), "the console script is installed with the package"
    return subprocess.run(
        [str(exe), *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def test_corevital_run_with_the_seed_flags_writes_the_trace_file_and_posts_it(tiny_gpt2, tmp_path):
    with Server() as server:
        proc = _corevital(
            [
                "run",
                "--model",
                tiny_gpt2,
                "--prompt",
                "Hello, world: a=b",
                "--max_new_tokens",
                "5",
                "--device",
                "cpu",
                "--seed",
                "7",
                "--temperature",
                "0.7",
                "--top_k",
                "20",
                "--top_p",
                "0.9",
                "--out",
                "res/trace.json",
                "--remote_sink",
                "http",
                "--remote_url",
                server.url,
            ],
            tmp_path,
        )
    assert proc.returncode == 0, proc.stderr
    trace = json.loads((tmp_path / "res" / "trace.json").read_text())
    rc = trace["run_config"]
    assert trace["prompt"]["text"] == "Hello, world: a=b" and rc["seed"] == 7 and rc["max_new_tokens"] == 5
    assert rc["generation"] == {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    assert rc["device_requested"] == "cpu" and rc["sink"]["type"] == "http" and len(server.requests) == 1
    assert (tmp_path / "res" / "trace.corevital" / "summaries.parquet").is_file()
    assert "trace: res/trace.json" in proc.stdout
    directory = _corevital(["run", "--model", tiny_gpt2, "--max_new_tokens", "2", "--out", "jobdir"], tmp_path)
    assert directory.returncode == 0 and (tmp_path / "jobdir" / "traces" / "prompt_00000.json").is_file()
    bad = _corevital(["run", "--model", tiny_gpt2, "--top_p", "2"], tmp_path)
    assert bad.returncode == 2 and "sampling.top_p must be in (0, 1]" in bad.stderr


def test_validate_and_schema(small_sweep, tmp_path):
    from jsonschema import Draft202012Validator

    schema = json.loads(_corevital(["schema"], tmp_path).stdout)
    assert schema["title"] == "Trace" and "TimelineStep" in schema["$defs"]
    traces = sorted(small_sweep.glob("*/traces/*.json"))
    Draft202012Validator(schema).validate(json.loads(traces[0].read_text()))
    ok = _corevital(["validate", *map(str, traces)], tmp_path)
    assert ok.returncode == 0 and ok.stdout.count(": ok") == len(traces)
    doc = json.loads(traces[0].read_text())
    doc["timeline"][2]["layers"][1]["hidden_summary"]["mean"] = "high"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    (tmp_path / "notjson.json").write_text("{")
    bad = _corevital(["validate", str(traces[0]), str(tmp_path / "bad.json"), str(tmp_path / "notjson.json")], tmp_path)
    assert bad.returncode == 1
    assert re.search(r"bad.json: invalid at timeline/2/layers/1/hidden_summary/mean: 'high' is not", bad.stderr), (
        bad.stderr
    )
    assert "notjson.json: not a readable JSON file" in bad.stderr
