"""`hydra/launcher=slurm`: Hydra's submitit SLURM launcher with what a sweep on a real cluster
needs (docs/cluster.md).

- Before anything is submitted, a `signal_delay_s` that does not fit in `timeout_min` is one
  sentence (the time-limit signal would arrive at once).
- A task SLURM ends without a result (cancelled, killed at its limit, its node lost) does not
  stop the sweep with submitit's traceback: its `status.json` says what SLURM reported, the
  other tasks' results are collected, and the manifest lists it (a rerun of the sweep resumes
  it after its committed batches).
- `ids()`: the task's SLURM ids, for its `status.json` and `run.log`.

Requeueing (`max_num_timeout`, `--requeue`) and the time-limit signal's default delay are set
in `conf/hydra/launcher/slurm.yaml`; stopping between batches on a signal is `stopping.py`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from corevital.runner import jobs

log = logging.getLogger("corevital")
# what a task's environment says about it, as (status.json key, variable)
IDS = (
    ("job_id", "SLURM_JOB_ID"),
    ("array_job_id", "SLURM_ARRAY_JOB_ID"),
    ("array_task_id", "SLURM_ARRAY_TASK_ID"),
    ("restart_count", "SLURM_RESTART_COUNT"),
    ("node", "SLURMD_NODENAME"),
    ("cpus_per_task", "SLURM_CPUS_PER_TASK"),
)
SIGNAL_DELAY_CAP_S = 120  # the plugin's own default, for limits of 8 minutes and more
RESOLVER = "corevital_signal_delay"


def ids(env: dict | None = None) -> dict[str, str]:
    """The SLURM ids of the task this process runs in; {} outside SLURM."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return {}
    return {key: env[var] for key, var in IDS if env.get(var)}


def describe(found: dict[str, str]) -> str:
    """`SLURM job 12_3 (job id 15, restart 1) on node n01, 1 CPU(s)` for run.log."""
    name = f"{found['array_job_id']}_{found['array_task_id']}" if "array_task_id" in found else found["job_id"]
    return (
        f"SLURM job {name} (job id {found['job_id']}, restart {found.get('restart_count', '0')})"
        f" on node {found.get('node', '?')}, {found.get('cpus_per_task', '?')} CPU(s)"
    )


def default_signal_delay(timeout_min: int) -> int:
    """Seconds before the limit at which a task is told to stop: a quarter of its limit, at most
    SIGNAL_DELAY_CAP_S; enough to finish the batch in flight, and inside any limit."""
    return int(min(SIGNAL_DELAY_CAP_S, max(1, int(timeout_min) * 60 // 4)))


def register_resolver() -> None:
    """`${corevital_signal_delay:${.timeout_min}}` in conf/hydra/launcher/slurm.yaml."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, default_signal_delay)


def limit_problem(params: dict[str, Any]) -> str | None:
    """Why these launcher settings cannot stop a task before its limit, or None."""
    limit_s, delay = int(params.get("timeout_min") or 0) * 60, int(params.get("signal_delay_s") or 0)
    if limit_s and delay >= limit_s:
        return (
            f"hydra.launcher.signal_delay_s={delay} is not shorter than the time limit "
            f"(timeout_min={params['timeout_min']}, {limit_s} s), so every task would be told to stop as it starts; "
            f"lower signal_delay_s (leave it out for {default_signal_delay(int(params['timeout_min']))} s)"
        )
    return None


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """The plugin's `launch` (one job array through submitit), with the check before
    submitting and the tolerant collection; `launcher` is the plugin's launcher object
    (hydra_plugins/corevital_slurm), whose `__call__` runs each job in its task."""
    import submitit

    params = launcher.params
    problem = limit_problem(params)
    if problem:
        print(f"corevital: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"submitit_folder", "max_num_timeout"}
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in skip})
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("SLURM sweep of %d job(s) in %s", len(job_overrides), sweep_dir)
    calls = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        calls.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    submitted = executor.map_array(launcher, *zip(*calls))
    return [_collect(job, list(o), sweep_dir) for job, o in zip(submitted, job_overrides)]


def _collect(job, overrides: list[str], sweep_dir: Path) -> JobReturn:
    """The task's JobReturn; a task SLURM ended without one is recorded in its status.json and
    counted as returned, so that the sweep goes on to its manifest (which lists it)."""
    from submitit.core.utils import UncompletedJobError

    try:
        return job.results()[0]
    except Exception as e:  # the task's own exception reaches here only if Hydra's run_job let it through
        state = job.state
        why = (
            f"SLURM ended task {job.job_id} ({state}) before it finished"
            if isinstance(e, UncompletedJobError)
            else f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        )
        name = jobs.job_name(overrides)
        jobs.ended_elsewhere(sweep_dir / name, state, why)
        print(f"corevital: error: {name}: {why}", file=sys.stderr)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
