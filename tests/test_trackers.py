"""tracker=mlflow against a real local MLflow store (sqlite), read back through MLflow's own
client; tracker=wandb in offline mode, its run file read back record by record with W&B's own
protobuf definitions. Expected values come from the job's files, read here with pandas."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from corevital.assess.signals import SIGNALS

from conftest import run_cli


def _prompts(tmp_path: Path) -> str:
    """Six questions; the regex answers make half of any output right and half wrong."""
    path = tmp_path / "q.jsonl"
    lines = [{"prompt": f"Question {i}: say something", "answer": "." if i % 2 else "^zzqq$", "grader": "regex"}
             for i in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _sweep(tiny_llama: str, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    sweep = tmp_path / "sweep"
    args = ["-m", f"model.name_or_path={tiny_llama}", f"prompts={_prompts(tmp_path)}", "sampling.max_new_tokens=6",
            "seed=1,2", f"hydra.sweep.dir={sweep}", *extra]  # fmt: skip
    return args, sweep


def _expected(job_dir: Path) -> dict[str, float]:
    traces = pd.read_parquet(job_dir / "traces.parquet")
    rows = pd.read_parquet(job_dir / "summaries.parquet", columns=["trace_id"])
    status = json.loads((job_dir / "status.json").read_text())
    out = {"traces": len(traces), "rows": len(rows), "generated_tokens": traces.generated_tokens.sum()}
    out["tokens_per_s"] = out["generated_tokens"] / status["timings"]["generate_s"]
    for s in SIGNALS:
        if traces[s.name].notna().any():
            out[f"signal/{s.name}"] = traces[s.name].astype(float).mean()
    return out


def test_mlflow_runs_hold_each_jobs_params_metrics_artifact_and_evaluation(tiny_llama, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="pip install 'corevital[mlflow]' (./scripts/test does)")
    args, sweep = _sweep(tiny_llama, tmp_path, "tracker=mlflow")
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep")  # the sweep dir's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    jobs = sorted(p.parent for p in sweep.glob("*/status.json"))
    assert sorted(runs) == [j.name for j in jobs]
    for job in jobs:
        run = runs[job.name]
        overrides = json.loads((job / "status.json").read_text())["overrides"]
        assert run.data.params == dict(o.split("=", 1) for o in overrides)  # each key as given
        assert run.data.params["seed"] in ("1", "2") and run.data.params["sampling.max_new_tokens"] == "6"
        expected = _expected(job)
        assert set(run.data.metrics) == set(expected)
        for key, value in expected.items():
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-9), key
        assert run.info.status == "FINISHED"
        local = client.download_artifacts(run.info.run_id, "traces.parquet", str(tmp_path / run.info.run_id))
        assert Path(local).read_bytes() == (job / "traces.parquet").read_bytes()

    evaluated = subprocess.run(
        [sys.executable, "-m", "corevital.cli", "evaluate", str(sweep)], capture_output=True, text=True, timeout=300
    )
    assert evaluated.returncode == 0, evaluated.stderr
    ranking = pd.read_parquet(sweep / "evaluation" / "signals.parquet")
    pooled = ranking[ranking.model == "all"].set_index("signal").auroc.dropna()
    assert len(pooled) > 5
    for job in jobs:
        run = client.get_run(runs[job.name].info.run_id)
        for name, auroc in pooled.items():
            assert run.data.metrics[f"auroc/{name}"] == pytest.approx(auroc, rel=1e-9), name
        assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == ["evaluation/signals.parquet"]


def test_an_unreachable_tracker_fails_the_job_before_anything_loads(tiny_llama, tmp_path):
    pytest.importorskip("mlflow", reason="pip install 'corevital[mlflow]' (./scripts/test does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    run_dir = tmp_path / "run"
    out = run_cli(
        [f"model.name_or_path={tiny_llama}", "prompt=hi", "tracker=mlflow", f"tracker.uri=http://127.0.0.1:{port}",
         f"hydra.run.dir={run_dir}"],
        tmp_path,
    )  # fmt: skip
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("corevital: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"corevital: error: tracker=mlflow could not be reached (tracker.uri=http://127.0.0.1:{port})"
    )
    assert "loaded model" not in (run_dir / "run.log").read_text()
    assert not (run_dir / "summaries.parquet").exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_one_sentence_naming_the_extra(kind, tmp_path, monkeypatch):
    from corevital.core.config import ConfigError, TrackerConfig
    from corevital.output import trackers

    monkeypatch.setitem(sys.modules, kind, None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, f"{kind}.tracking", None)
    with pytest.raises(ConfigError) as e:
        trackers.open_run(TrackerConfig(type=kind), tmp_path, "job", {})
    assert str(e.value) == f"tracker={kind} needs the {kind} package: pip install 'corevital[{kind}]'"


# ---- W&B's offline run file: LevelDB's log format (32 KiB blocks of framed chunks) after a
# 7-byte header, each record a wandb_internal_pb2.Record --------------------------------------
def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_jobs_params_metrics_and_artifact(tiny_llama, tmp_path):
    pytest.importorskip("wandb", reason="pip install 'corevital[wandb]' (./scripts/test does)")
    args, sweep = _sweep(tiny_llama, tmp_path, "tracker=wandb", "seed=1")
    out = run_cli(args, tmp_path, env={"WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    (job,) = [p.parent for p in sweep.glob("*/status.json")]
    ref = json.loads((job / "status.json").read_text())["tracker"]
    (path,) = list((sweep / ".wandb" / "wandb").glob(f"offline-run-*-{ref['run_id']}/run-{ref['run_id']}.wandb"))
    records = list(_wandb_records(path))
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].display_name == job.name and runs[0].project == "sweep"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    overrides = json.loads((job / "status.json").read_text())["overrides"]
    assert {k: v for k, v in config.items() if not k.startswith("_")} == dict(o.split("=", 1) for o in overrides)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    for key, value in _expected(job).items():
        assert summary[key] == pytest.approx(value, rel=1e-6), key
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, [c.path for c in a.manifest.contents]) for a in artifacts] == [("traces", ["traces.parquet"])]


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_a_job_interrupted_and_rerun_continues_its_tracker_run(kind, tiny_llama, tmp_path):
    """Ctrl-C after a few traces, then the rerun that resumes the job: one tracker run, the
    same id in both status files, finished with the whole job's metrics."""
    pytest.importorskip(kind, reason=f"pip install 'corevital[{kind}]' (./scripts/test does)")
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"Prompt number {i} says\n" for i in range(90)))
    out = tmp_path / "out"
    args = [f"model.name_or_path={tiny_llama}", f"prompts={prompts}", "sampling.max_new_tokens=24",
            f"tracker={kind}", "hydra.run.dir=out"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.run", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list((out / "traces").glob("*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    first = json.loads((out / "status.json").read_text())
    assert proc.returncode == 130 and first["status"] == "interrupted"
    rerun = run_cli(args, tmp_path, env={"WANDB_SILENT": "true"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    second = json.loads((out / "status.json").read_text())
    assert second["tracker"]["run_id"] == first["tracker"]["run_id"]
    if kind == "mlflow":
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("out").experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics["traces"] == 90
