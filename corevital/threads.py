"""Each job's share of the CPU cores.

torch starts one compute thread per core in every process. Jobs that run side by side on
one machine (Hydra's submitit_local and joblib launchers) then fight over the cores, and two
such jobs on 2 cores ran 17x slower than one alone. So the process that launches a sweep
(`callbacks.ThreadShare`) puts each job's share in COREVITAL_THREADS: the cores over the
jobs running at once, at least 1. A job sets torch's thread count from, in order: the
`threads` config key, COREVITAL_THREADS, SLURM_CPUS_PER_TASK; else torch's default.
An OMP_NUM_THREADS set by the user is left alone (no share is computed).
"""

from __future__ import annotations

import os

ENV = "COREVITAL_THREADS"
LOCAL_LAUNCHERS = {"LocalLauncher": "submitit_local", "JoblibLauncher": "joblib"}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def concurrent_jobs(launcher, jobs: int) -> int | None:
    """How many of `jobs` a local parallel launcher runs at once; None for other launchers."""
    kind = LOCAL_LAUNCHERS.get(str(launcher.get("_target_", "")).rsplit(".", 1)[-1])
    if kind == "joblib":
        n = int(launcher.get("n_jobs", -1))
        n = cores() + 1 + n if n < 0 else n  # joblib: -1 all cores, -2 all but one, ...
        return max(1, min(jobs, n))
    if kind == "submitit_local":  # every job starts at once, tasks_per_node processes each
        return max(1, jobs * int(launcher.get("tasks_per_node") or 1))
    return None


def share(launcher, jobs: int) -> int | None:
    """Threads per job for a sweep of `jobs` jobs under `launcher`, or None to leave it."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    if launcher.get("cpus_per_task") and concurrent_jobs(launcher, jobs) is not None:
        return int(launcher.cpus_per_task)
    at_once = concurrent_jobs(launcher, jobs)
    return None if at_once is None else max(1, cores() // at_once)


def apply(configured: int | None) -> int | None:
    """Set torch's thread count for this job (see the module docstring); returns it, or None."""
    import torch

    slurm = None if "OMP_NUM_THREADS" in os.environ else os.environ.get("SLURM_CPUS_PER_TASK")
    for value in (configured, os.environ.get(ENV), slurm):
        if value:
            torch.set_num_threads(int(value))
            return int(value)
    return None
