"""Sweeps that survive: stable job dirs, resume, SIGKILL, failure isolation, manifest,
launchers (basic, submitit_local, joblib), prompt-file sweeps and the sweep dataset."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from corevital.analysis import load_sweep
from corevital.core.prompts import PromptError, expand_prompt_globs
from corevital.output.table import TRACES_SCHEMA
from corevital.runner import jobs, threads

from conftest import PROMPTS, run_cli


# --- unit tier: names, globs -------------------------------------------------------------
def test_job_name_is_sorted_sanitised_and_ignores_run_only_keys():
    a = jobs.job_name(["seed=3", "model=gpt2", "prompts=data/a b.txt"])
    assert a == "model=gpt2,prompts=data_a_b.txt,seed=3"
    assert jobs.job_name(["prompts=data/a b.txt", "seed=3", "model=gpt2", "resume=false", "hydra.verbose=true"]) == a
    assert jobs.job_name([]) == "default"
    long = jobs.job_name([f"prompts=/very/long/path/{'x' * 200}.txt"])
    other = jobs.job_name([f"prompts=/very/long/path/{'x' * 199}y.txt"])
    assert len(long) == jobs.MAX_NAME and long != other  # a hash of the full text tells them apart


def test_prompt_globs_expand_to_sorted_sweep_lists(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl", "it's.txt"):
        (tmp_path / name).write_text("x\n")
    args = expand_prompt_globs(["seed=1", f"prompts={tmp_path}/*.txt"], sweeping=True)
    assert args == ["seed=1", f"prompts={tmp_path}/a.txt,{tmp_path}/b.txt,'{tmp_path}/it\\'s.txt'"]
    assert expand_prompt_globs([f"prompts={tmp_path}/c*"], sweeping=False) == [f"prompts={tmp_path}/c.jsonl"]
    with pytest.raises(PromptError, match="matches 3 files; add -m"):
        expand_prompt_globs([f"prompts={tmp_path}/*.txt"], sweeping=False)
    with pytest.raises(PromptError, match="matches no file"):
        expand_prompt_globs([f"prompts={tmp_path}/*.csv"], sweeping=True)


def test_slurm_launcher_config_renders_an_sbatch_script(tmp_path):
    """`hydra/launcher=slurm`: the submitit SLURM launcher with our defaults, as submitit would submit it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from submitit.slurm.slurm import _make_sbatch_string

    from corevital.core import config

    config.register()
    jobs.register_resolver()
    with initialize_config_dir(config.config_dir(), version_base=None):
        cfg = hydra_compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.timeout_min, launcher.gpus_per_node, launcher.array_parallelism) == (120, 1, 32)
    script = _make_sbatch_string(
        command="python -m x",
        folder=str(tmp_path),
        job_name="corevital",
        partition=launcher.partition,
        time=launcher.timeout_min,
        gpus_per_node=launcher.gpus_per_node,
        mem=f"{launcher.mem_gb}GB",
        cpus_per_task=launcher.cpus_per_task,
        array_parallelism=launcher.array_parallelism,
        map_count=100,
        setup=list(launcher.setup),
    )
    for line in (
        "#SBATCH --time=120",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --array=0-99%32",
        "#SBATCH --partition=gpu",
        "export PYTHONUNBUFFERED=1",
    ):
        assert line in script


def test_thread_share_per_launcher(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 16)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    cases = [
        ({"_target_": joblib, "n_jobs": 4}, 10, 4),
        ({"_target_": joblib, "n_jobs": -1}, 3, 5),
        ({"_target_": joblib, "n_jobs": 8}, 32, 2),
        ({"_target_": local, "tasks_per_node": 1}, 3, 5),
        ({"_target_": local, "tasks_per_node": 1}, 40, 1),
        ({"_target_": local, "cpus_per_task": 6}, 3, 6),
        ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 3, None),
        ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}, 3, None),
    ]
    for launcher, jobs_, expected in cases:
        assert threads.share(OmegaConf.create(launcher), jobs_) == expected, launcher
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting stands
    assert threads.share(OmegaConf.create(cases[0][0]), 10) is None


# --- real multiruns ----------------------------------------------------------------------
def _sweep(model: str, prompts: str, sweep: Path, *extra: str, tokens: int = 4) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"prompts={prompts}",
        f"sampling.max_new_tokens={tokens}",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]


def _status(job: Path) -> dict:
    return json.loads((job / jobs.STATUS).read_text())


def _job(sweep: Path, *overrides: str) -> Path:
    return sweep / jobs.job_name(overrides)


def test_rerun_with_more_seeds_runs_only_the_new_job_and_resume_false_reruns_all(tiny_gpt2, prompt_file, tmp_path):
    sweep = tmp_path / "sweep"
    common = [f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", "sampling.max_new_tokens=4"]
    first = run_cli([*_sweep(tiny_gpt2, prompt_file, sweep), "-m", "seed=2,1"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(
        jobs.job_name([*common, f"seed={s}"]) for s in (1, 2)
    )
    seed1 = _job(sweep, *common, "seed=1")
    trace_ids = pd.read_parquet(seed1 / "traces.parquet").trace_id.tolist()

    # Overrides in another order, one more seed: only seed=3 runs.
    second = run_cli(
        [
            f"hydra.sweep.dir={sweep}",
            "sampling.max_new_tokens=4",
            f"prompts={prompt_file}",
            "-m",
            "seed=1,2,3",
            f"model.name_or_path={tiny_gpt2}",
        ],
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("skipped, already done") == 2 and second.stdout.count("3 trace(s)") == 1
    assert pd.read_parquet(seed1 / "traces.parquet").trace_id.tolist() == trace_ids, (
        "a skipped job's outputs are untouched"
    )
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["counts"] == {"skipped": 2, "done": 1}
    assert [j["name"] for j in manifest["jobs"]] == [jobs.job_name([*common, f"seed={s}"]) for s in (1, 2, 3)]
    assert all(j["status"] == "done" and j["rows"] > 0 for j in manifest["jobs"])
    assert manifest["jobs"][0]["outputs"] == json.loads((seed1 / jobs.DONE).read_text())["outputs"]

    # resume=false reruns every job into the same dirs; the same seed draws the same tokens.
    tokens = pd.read_parquet(seed1 / "traces.parquet").output_text.tolist()
    third = run_cli([*_sweep(tiny_gpt2, prompt_file, sweep), "resume=false", "-m", "seed=1,2,3"], cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "skipped" not in third.stdout
    rerun = pd.read_parquet(seed1 / "traces.parquet")
    assert rerun.output_text.tolist() == tokens and set(rerun.trace_id).isdisjoint(trace_ids)

    # A changed config (here: the prompt file's contents) is not skipped either.
    Path(prompt_file).write_text("A different prompt\n")
    fourth = run_cli([*_sweep(tiny_gpt2, prompt_file, sweep), "-m", "seed=1"], cwd=tmp_path)
    assert fourth.returncode == 0 and "skipped" not in fourth.stdout
    assert pd.read_parquet(seed1 / "traces.parquet").prompt_text.tolist() == ["A different prompt"]
    assert sorted(p.name for p in (seed1 / "traces").iterdir()) == ["prompt_00000.json"], "stale traces removed"


def _committed(job: Path) -> pd.DataFrame:
    """The traces of the batches a job has committed so far (its parts)."""
    parts = sorted((job / "parts").glob("*.traces.parquet"))
    return (
        pd.concat([pd.read_parquet(p) for p in parts]) if parts else pd.DataFrame({"trace_id": [], "prompt_index": []})
    )


def test_job_killed_mid_run_keeps_whole_batches_and_the_rerun_generates_only_the_rest(tiny_llama, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 30) + "\n")  # 90 prompts in 30 batches of 3
    sweep = tmp_path / "sweep"
    args = _sweep(tiny_llama, str(prompts), sweep, "batch_size=3", "-m", "seed=7", tokens=24)
    job = _job(sweep, *args[:3], "batch_size=3", "seed=7")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=tmp_path,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_committed(job)) < 12:
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _status(job)["status"] == "running"
    assert (
        not (job / jobs.DONE).exists()
        and not (job / "summaries.parquet").exists()
        and not (job / "traces.parquet").exists()
    )
    for trace in (job / "traces").glob("*.json"):  # every file under its final name is whole
        json.loads(trace.read_text())
    with pytest.raises(FileNotFoundError):
        load_sweep(sweep)  # nothing a reader would take for a finished job
    kept = _committed(job)
    assert 12 <= len(kept) < 90 and len(kept) % 3 == 0 and sorted(kept.prompt_index) == list(range(len(kept)))

    rerun = run_cli(args, cwd=tmp_path)  # takes over the dead process's lock
    assert rerun.returncode == 0, rerun.stderr
    logs = rerun.stdout + rerun.stderr
    assert f"resuming: {len(kept) // 3} batch(es) of {len(kept)} prompt(s) kept" in logs
    assert len(re.findall(r"trace \d+/90:", logs)) == 90 - len(kept), "only the prompts without a kept trace ran"
    assert _status(job)["status"] == "done" and (job / jobs.DONE).exists() and not (job / "parts").exists()
    assert not list(job.rglob(".*.tmp-*"))
    traces = load_sweep(sweep, table="traces")
    assert traces.prompt_index.tolist() == list(range(90)) and traces.trace_id.is_unique
    assert set(kept.trace_id) <= set(traces.trace_id), "the kept traces are the job's, not regenerated"
    files = {json.loads(p.read_text())["trace_id"] for p in (job / "traces").glob("*.json")}
    assert files == set(traces.trace_id) == set(load_sweep(sweep, columns=["trace_id"]).trace_id.astype(str))
    rows = load_sweep(sweep, columns=["trace_id"]).groupby("trace_id", observed=True).size()
    assert (
        rows == traces.set_index("trace_id").eval("(prompt_tokens + generated_tokens) * num_layers")[rows.index]
    ).all()


def test_resume_inside_a_job_keeps_only_what_the_same_config_committed(tiny_gpt2, tmp_path, monkeypatch):
    """In process: a job stopped after two batches; reruns with the same config, with
    resume=false, and with an edited prompt file."""
    from corevital.runner import app as run

    from conftest import compose

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")  # 6 prompts, 3 batches of 2
    generated, real = [], run._generate  # one call per batch (not the writer choice's short timing runs)

    def counting(cfg, loaded, batch, *a, **kw):
        if len(generated) == 4 and stop_after_two[0]:
            raise KeyboardInterrupt
        generated.extend(p.text for p in batch)
        return real(cfg, loaded, batch, *a, **kw)

    monkeypatch.setattr(run, "_generate", counting)
    stop_after_two = [True]
    overrides = [f"model.name_or_path={tiny_gpt2}", f"prompts={prompts}", "sampling.max_new_tokens=3", "batch_size=2"]
    with pytest.raises(KeyboardInterrupt):
        run.run_job(compose(overrides), tmp_path / "job", "tiny")
    kept = _committed(tmp_path / "job")
    assert sorted(kept.prompt_index) == [0, 1, 2, 3] and not (tmp_path / "job" / "traces.parquet").exists()

    stop_after_two[0], generated[:] = False, []
    result = run.run_job(compose(overrides), tmp_path / "job", "tiny")
    assert generated == PROMPTS[1:] and result.traces == 6  # batch 3 (prompts 4 and 5) only
    traces = pd.read_parquet(tmp_path / "job" / "traces.parquet")
    assert traces.prompt_index.tolist() == list(range(6)) and set(kept.trace_id) < set(traces.trace_id)

    for change in (["resume=false"], []):  # resume=false reruns all; so does an edited prompt file
        if not change:
            prompts.write_text("\n".join(PROMPTS[::-1] * 2) + "\n")
        (tmp_path / "job" / "parts").mkdir(exist_ok=True)
        generated[:] = []
        run.run_job(compose([*overrides, *change]), tmp_path / "job", "tiny")
        assert len(generated) == 6
        assert set(pd.read_parquet(tmp_path / "job" / "traces.parquet").trace_id).isdisjoint(traces.trace_id)


def test_a_job_dir_written_by_a_live_process_is_refused_and_never_mixed(tiny_gpt2, prompt_file, tmp_path):
    from corevital.core.lock import job_lock

    sweep = tmp_path / "sweep"
    args = _sweep(tiny_gpt2, prompt_file, sweep, "-m", "seed=1,2")
    locked = _job(sweep, *args[:3], "seed=1")
    with job_lock(locked):  # this test process is the live writer of seed=1's dir
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 1
        assert (
            f"corevital: error: {locked.name}: the job dir {locked} is being written by process {os.getpid()}"
            in proc.stderr
        )
        manifest = json.loads((sweep / "manifest.json").read_text())
        assert manifest["counts"] == {"running": 1, "done": 1}, "the sweep went on with the other job"
        assert not (locked / "traces").exists() and not (locked / jobs.STATUS).exists(), "nothing written into it"
        from corevital.core.config import quote_value

        single = run_cli([*args[:3], f"hydra.run.dir={quote_value(str(locked))}"], cwd=tmp_path)
        assert single.returncode == 2 and "Traceback" not in single.stderr
        assert [line for line in single.stderr.splitlines() if line.startswith("corevital:")] == [
            f"corevital: error: the job dir {locked} is being written by process {os.getpid()} "
            f"on {socket.gethostname()} (since {json.loads((locked / '.lock').read_text())['since']}); "
            "wait for it to finish, or write elsewhere (hydra.run.dir=..., hydra.sweep.dir=...)"
        ]

    # Two real processes started together on one dir: one writes, the other refuses or finds it done.
    out = tmp_path / "both"
    cmd = [sys.executable, "-m", "corevital.run", *args[:3], f"hydra.run.dir={out}", "threads=1"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    wrote = [r for r in results if r[0] == 0 and "3 trace(s)" in r[1]]
    assert len(wrote) == 1, results
    other = next(r for r in results if r is not wrote[0])
    assert (other[0] == 2 and "is being written by process" in other[2]) or "skipped, already done" in other[1], other
    traces = pd.read_parquet(out / "traces.parquet")
    files = {json.loads(p.read_text())["trace_id"] for p in (out / "traces").glob("*.json")}
    assert len(traces) == 3 and files == set(traces.trace_id) == set(
        pd.read_parquet(out / "summaries.parquet").trace_id
    )


def test_one_failing_job_does_not_stop_the_others_and_the_sweep_names_it(tiny_gpt2, prompt_file, tmp_path):
    """Four jobs: one fine, one with an empty prompt file, one that crashes inside transformers
    (a float8 dtype it cannot build a model in), one with both."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [*_sweep(tiny_gpt2, f"{prompt_file},{empty}", sweep), "-m", "model.dtype=float32,float8_e4m3fn"], cwd=tmp_path
    )
    assert proc.returncode == 1
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["counts"] == {"done": 1, "failed": 3}
    by_name = {j["name"]: j for j in manifest["jobs"]}
    common = [f"model.name_or_path={tiny_gpt2}", "sampling.max_new_tokens=4", f"prompts={prompt_file}"]
    good = by_name[jobs.job_name([*common, "model.dtype=float32"])]
    assert good["status"] == "done" and good["traces"] == 3
    bad_prompt = [j for j in manifest["jobs"] if f"prompts={empty}" in j["overrides"]]
    assert len(bad_prompt) == 2 and all("holds no prompts" in j["error"] for j in bad_prompt)
    crash = by_name[jobs.job_name([*common, "model.dtype=float8_e4m3fn"])]
    assert crash["status"] == "failed" and crash["error"].startswith("TypeError")
    for j in manifest["jobs"]:
        if j["status"] == "failed":
            assert j["name"] in proc.stderr
            assert not (Path(j["dir"]) / "summaries.parquet").exists() and not (Path(j["dir"]) / jobs.DONE).exists()
    assert "Traceback" in (Path(crash["dir"]) / "run.log").read_text(), (
        "the unexpected error's traceback is in the job log"
    )


@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ],
    ids=["submitit_local", "joblib"],
)
def test_other_launchers_isolate_failures_resume_and_write_the_manifest(launcher, tiny_gpt2, prompt_file, tmp_path):
    """Jobs run in worker processes: status comes from the files they write. Two jobs (one
    prompt file missing), side by side: each on its share of the cores."""
    sweep = tmp_path / "sweep"
    first = run_cli([*_sweep(tiny_gpt2, f"{prompt_file},missing.txt", sweep), *launcher, "-m", "seed=1"], cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["counts"] == {"done": 1, "failed": 1}
    assert {j["error"] for j in manifest["jobs"] if j["status"] == "failed"} == {
        "PromptError: prompt file 'missing.txt' does not exist; check prompts=PATH"
    }
    done = [Path(j["dir"]) for j in manifest["jobs"] if j["status"] == "done"]
    assert all(pq.read_metadata(d / "summaries.parquet").num_rows > 0 for d in done)
    share = max(1, threads.cores() // 2)  # joblib: n_jobs=2; submitit_local starts both jobs at once
    for d in done:  # each worker took its share of the cores, not torch's default of all of them
        assert f"torch uses {share} CPU thread(s)" in (d / "run.log").read_text()

    (tmp_path / "missing.txt").write_text("Now it exists\n")
    second = run_cli([*_sweep(tiny_gpt2, f"{prompt_file},missing.txt", sweep), *launcher, "-m", "seed=1"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads((sweep / "manifest.json").read_text())["counts"] == {"skipped": 1, "done": 1}
    assert len(load_sweep(sweep, table="traces")) == 3 + 1


# --- the sweep dataset -------------------------------------------------------------------
@pytest.fixture(scope="module")
def twelve_job_sweep(tmp_path_factory, tiny_gpt2, tiny_llama) -> Path:
    """2 prompt files (a glob) x 2 tiny models x 3 seeds, one multirun."""
    root = tmp_path_factory.mktemp("twelve")
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "data" / "b.jsonl").write_text('{"prompt": "Hidden states grow", "id": "h1"}\n')
    proc = run_cli(
        [
            f"model.name_or_path={tiny_gpt2},{tiny_llama}",
            "prompts=data/*",
            "sampling.max_new_tokens=5",
            "hydra.sweep.dir=sweep",
            "-m",
            "seed=1,2,3",
        ],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    return root / "sweep"


def test_twelve_job_sweep_loads_into_one_dataframe(twelve_job_sweep):
    df = load_sweep(twelve_job_sweep)
    traces = load_sweep(twelve_job_sweep, table="traces")
    assert len(traces) == 2 * 3 * (3 + 1)  # models x seeds x prompts of both files
    assert len(df) == int(((traces.prompt_tokens + traces.generated_tokens) * traces.num_layers).sum())
    assert len(df) == sum(pq.read_metadata(f).num_rows for f in twelve_job_sweep.glob("*/summaries.parquet"))
    assert sorted(df.prompt_source.unique()) == ["data/a.txt", "data/b.jsonl"]
    assert df.groupby(["model_id", "seed", "prompt_source"], observed=True).trace_id.nunique().tolist() == [3, 1] * 6
    assert isinstance(df.token_text.dtype, pd.CategoricalDtype) and isinstance(df.model_id.dtype, pd.CategoricalDtype)
    assert json.loads((twelve_job_sweep / "manifest.json").read_text())["counts"] == {"done": 12}


def test_load_sweep_projects_and_pushes_filters_down(twelve_job_sweep):
    full = load_sweep(twelve_job_sweep)
    tuples = load_sweep(
        twelve_job_sweep,
        columns=["seed", "step_index", "logits_entropy"],
        filters=[("seed", "in", [1, 3]), ("is_prompt_token", "==", False)],
    )
    assert list(tuples.columns) == ["seed", "step_index", "logits_entropy"]
    expected = full[full.seed.isin([1, 3]) & ~full.is_prompt_token]
    assert len(tuples) == len(expected) > 0
    assert tuples.logits_entropy.sum() == pytest.approx(expected.logits_entropy.sum(), rel=1e-6)
    expr = load_sweep(twelve_job_sweep, columns=["seed"], filters=(pc.field("seed") == 2) | (pc.field("seed") == 3))
    assert sorted(expr.seed.unique()) == [2, 3] and len(expr) == (full.seed >= 2).sum()
    with pytest.raises(ValueError, match="table must be one of"):
        load_sweep(twelve_job_sweep, table="nope")


def test_traces_parquet_has_one_row_per_trace_with_means_of_the_step_metrics(twelve_job_sweep):
    job = next(twelve_job_sweep.glob("*seed=2"))
    table = pq.read_table(job / "traces.parquet")
    assert table.schema.remove_metadata() == TRACES_SCHEMA
    rows = table.to_pandas()
    steps = pd.read_parquet(job / "summaries.parquet")
    steps = steps[steps.layer_index == 0]
    for _, row in rows.iterrows():
        mine = steps[steps.trace_id == row.trace_id]
        gen, prompt = mine[~mine.is_prompt_token], mine[mine.is_prompt_token & (mine.step_index > 0)]
        assert row.generated_tokens == len(gen) and row.prompt_tokens == len(prompt) + 1
        for m in ("logits_entropy", "logits_top1_prob", "logits_top1_top2_margin", "token_logprob"):
            column = "mean_top1_top2_margin" if m == "logits_top1_top2_margin" else f"mean_{m}"  # signals.py's names
            assert row[column] == pytest.approx(gen[m].astype("float64").mean(), rel=1e-5)
            if len(prompt):
                assert row[f"prompt_mean_{m}"] == pytest.approx(prompt[m].astype("float64").mean(), rel=1e-5)
            else:
                assert pd.isna(row[f"prompt_mean_{m}"])
        trace = json.loads((job / "traces" / f"prompt_{row.prompt_index:05d}.json").read_text())
        assert row.output_text == trace["generated"]["output_text"] and row.prompt_text == trace["prompt"]["text"]


def test_single_run_with_a_glob_matching_several_files_says_add_m(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x\n")
    proc = run_cli(["prompts=*.txt", "hydra.run.dir=out"], cwd=tmp_path)
    assert proc.returncode == 2 and "matches 2 files; add -m" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
