"""Sweeps through a real SLURM (`hydra/launcher=slurm`): a one-node cluster on localhost
(slurm_cluster.py) runs the job arrays submitit submits. Each case ends by checking that every
trace is there exactly once: one file per prompt whose trace id is the tables' (no file left by
an abandoned attempt), one row per prompt in traces.parquet, one trace per prompt in
summaries.parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from debian import skip_or_fail
from slurm_cluster import Cluster

from corevital.output.writer import Store

from conftest import run_cli


@pytest.fixture(scope="module")
def cluster():
    why = Cluster.available()
    if why:
        skip_or_fail(why)
    c = Cluster.start()
    yield c
    c.stop()


def _prompts(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"prompts{n}.txt"
    path.write_text("".join(f"Prompt number {i} says\n" for i in range(n)))
    return str(path)


def _sweep_args(model: str, prompts: str, sweep: Path, *extra: str, tokens: int = 8) -> list[str]:
    """CPU-sized overrides of the SLURM launcher: no GPU, one CPU, 2 GB per task."""
    return [
        "-m",
        "hydra/launcher=slurm",
        f"model.name_or_path={model}",
        f"prompts={prompts}",
        f"sampling.max_new_tokens={tokens}",
        "device=cpu",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]


def _jobs(sweep: Path) -> dict[str, dict]:
    """Each job dir's status.json, by dir name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/status.json")}


def _every_trace_once(job_dir: Path, n: int) -> None:
    traces = pd.read_parquet(job_dir / "traces.parquet", columns=["trace_id", "prompt_index"])
    assert sorted(traces.prompt_index) == list(range(n))
    rows = pd.read_parquet(job_dir / "summaries.parquet", columns=["trace_id", "prompt_index"])
    assert rows.groupby("prompt_index").trace_id.nunique().eq(1).all() and rows.prompt_index.nunique() == n
    assert set(rows.trace_id) == set(traces.trace_id)
    files = sorted((job_dir / "traces").glob("*.json"))
    assert len(files) == n
    ids = {json.loads(f.read_bytes())["trace_id"] for f in files}
    assert ids == set(traces.trace_id)  # no file from an attempt whose batch was not committed


def _spans(cluster, job: str, n: int, wait_s: float = 60.0) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """(start, end) of each of an array's n tasks, from SLURM's accounting. slurmdbd records a
    task's end a moment after the task reports done, so "Unknown" is waited out, not parsed."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = cluster.run("sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,Start,End").split()
        spans = [line.split("|")[1:] for line in lines if line]
        if (len(spans) == n and all("Unknown" not in span for span in spans)) or time.monotonic() > deadline:
            return [tuple(pd.Timestamp(t) for t in span) for span in spans]
        time.sleep(1)


def _manifest(sweep: Path) -> dict:
    return json.loads((sweep / "manifest.json").read_text())


def test_a_sweep_runs_as_one_job_array(cluster, tiny_llama, tmp_path):
    """4 jobs, one array, at most 2 tasks at once; torch's threads follow SLURM_CPUS_PER_TASK
    (1 here, where torch alone would take both cores)."""
    sweep = tmp_path / "sweep"
    args = _sweep_args(tiny_llama, _prompts(tmp_path, 8), sweep, "hydra.launcher.array_parallelism=2", "seed=1,2,3,4")
    out = run_cli(args, tmp_path, env=cluster.env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "corevital: 4 job(s) done" in out.stdout
    manifest, status = _manifest(sweep), _jobs(sweep)
    assert manifest["counts"] == {"done": 4} and len(status) == 4
    arrays = {s["slurm"]["array_job_id"] for s in status.values()}
    assert len(arrays) == 1 and sorted(int(s["slurm"]["array_task_id"]) for s in status.values()) == [0, 1, 2, 3]
    for name, s in status.items():
        assert s["timings"]["torch_threads"] == 1 and s["slurm"]["cpus_per_task"] == "1"
        assert (
            f"SLURM job {s['slurm']['array_job_id']}_{s['slurm']['array_task_id']}"
            in (sweep / name / "run.log").read_text()
        )
        _every_trace_once(sweep / name, 8)
    # SLURM's own record of when each task ran: never more than 2 at once
    times = _spans(cluster, arrays.pop(), 4)
    assert len(times) == 4
    most = max(sum(1 for s, e in times if s <= t < e) for t, _ in times)
    assert most <= 2
    script = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --requeue" in script


def test_a_job_past_its_time_limit_is_requeued_and_resumes(cluster, tiny_llama, tmp_path):
    """timeout_min=1: the default signal delay (a quarter of the limit) tells the task to stop
    before SLURM kills it; it finishes its batch, submitit requeues it, it resumes after the
    committed batches, and ends with every trace once. SLURM checks limits every 30 s, so the
    signal comes 15 to 45 s into a run: 1,200 prompts (about 50 s of work here) outlast it."""
    n, sweep = 1200, tmp_path / "sweep"
    args = _sweep_args(
        tiny_llama,
        _prompts(tmp_path, n),
        sweep,
        "batch_size=4",
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.max_num_timeout=10",
        tokens=64,
    )
    with cluster.releasing_requeued():
        out = run_cli(args, tmp_path, env=cluster.env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (name, status), *_ = _jobs(sweep).items()
    assert status["status"] == "done" and int(status["slurm"]["restart_count"]) >= 1
    log = (sweep / name / "run.log").read_text()
    assert "stopped between batches on SIGUSR2" in log and "Requeued job" in log and "resuming:" in log
    assert log.count("Job completed successfully") == 1
    assert "#SBATCH --signal=USR2@15" in next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    _every_trace_once(sweep / name, n)


def _wait_for(check, what: str, timeout: float = 240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _task_with_committed_batches(sweep: Path, task: int):
    """The job dir of array task `task` once it has committed a batch and is still running."""
    for name, s in _jobs(sweep).items():
        if s.get("slurm", {}).get("array_task_id") == str(task) and s["status"] == "running":
            if Store(sweep / name).committed():
                return sweep / name
    return None


def test_a_requeued_task_and_a_cancelled_one_end_with_every_trace_once(cluster, tiny_llama, tmp_path):
    """`scontrol requeue` of a running task: SIGTERM, it stops between batches, SLURM starts it
    again and it resumes. `scancel` of the other: the sweep ends listing it, and a rerun of the
    same sweep resumes it. Both end with every trace once."""
    n, sweep = 600, tmp_path / "sweep"
    args = _sweep_args(tiny_llama, _prompts(tmp_path, n), sweep, "batch_size=4", "seed=1,2", tokens=32)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **cluster.env()}
    with cluster.releasing_requeued():
        proc = subprocess.Popen(
            [sys.executable, "-m", "corevital.run", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        first = _wait_for(lambda: _task_with_committed_batches(sweep, 0), "task 0 to commit a batch")
        second = _wait_for(lambda: _task_with_committed_batches(sweep, 1), "task 1 to commit a batch")
        array = json.loads((first / "status.json").read_text())["slurm"]["array_job_id"]
        cluster.run("scontrol", "requeue", f"{array}_0")
        cluster.run("scancel", f"{array}_1")
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]
    manifest = {e["name"]: e for e in _manifest(sweep)["jobs"]}
    assert manifest[first.name]["status"] == "done"
    assert manifest[second.name]["status"] == "interrupted"
    assert manifest[second.name]["slurm_state"].startswith("CANCELLED")
    assert f"{second.name}: interrupted" in stderr
    log = (first / "run.log").read_text()
    assert "stopped between batches on SIGTERM" in log and "resuming:" in log
    assert json.loads((first / "status.json").read_text())["slurm"]["restart_count"] == "1"
    _every_trace_once(first, n)

    again = run_cli(args, tmp_path, env=cluster.env(), timeout=600)  # the user reruns the sweep
    assert again.returncode == 0, again.stderr[-3000:]
    assert _manifest(sweep)["counts"] == {"done": 1, "skipped": 1}
    assert "resuming:" in (second / "run.log").read_text()
    _every_trace_once(second, n)


def test_a_failing_job_fails_alone_with_its_reason(cluster, tiny_llama, tmp_path):
    """A bad model path fails its job with one sentence (in its log and the manifest); the other
    job, with 2 CPUs per task, finishes on 2 torch threads."""
    sweep, bad = tmp_path / "sweep", str(tmp_path / "no-such-model")
    args = _sweep_args(f"{tiny_llama},{bad}", _prompts(tmp_path, 4), sweep, "hydra.launcher.cpus_per_task=2")
    out = run_cli(args, tmp_path, env=cluster.env())
    assert out.returncode == 1
    entries = {e["overrides"][0].split("=", 1)[1]: e for e in _manifest(sweep)["jobs"]}
    good, failed = entries[tiny_llama], entries[bad]
    assert good["status"] == "done" and failed["status"] == "failed"
    assert bad in failed["error"] and "\n" not in failed["error"]
    assert failed["error"].split(": ", 1)[1] in (Path(failed["dir"]) / "run.log").read_text()
    assert json.loads((Path(good["dir"]) / "status.json").read_text())["timings"]["torch_threads"] == 2
    _every_trace_once(Path(good["dir"]), 4)


def test_a_signal_delay_longer_than_the_limit_is_one_sentence_before_submitting(tmp_path):
    """No cluster needed: nothing is submitted."""
    sweep = tmp_path / "sweep"
    args = _sweep_args("gpt2", _prompts(tmp_path, 1), sweep, "hydra.launcher.timeout_min=1")
    out = run_cli([*args, "hydra.launcher.signal_delay_s=90"], tmp_path, env={"SLURM_CONF": "/nonexistent"})
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("corevital:")]
    assert lines == [
        "corevital: error: hydra.launcher.signal_delay_s=90 is not shorter than the time limit (timeout_min=1, "
        "60 s), so every task would be told to stop as it starts; lower signal_delay_s (leave it out for 15 s)"
    ]
    assert not (sweep / ".submitit").exists()
