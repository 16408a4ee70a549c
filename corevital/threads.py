"""Each job's share of the CPU cores.

torch starts one compute thread per core in every process. Jobs that run side by side on
one machine (Hydra's submitit_local and joblib launchers) then fight over the cores, and two
such jobs on 2 cores ran 17x slower than one alone. So the process that launches a sweep
(`callbacks.ThreadShare`) puts each job's share in COREVITAL_THREADS: the cores over the
jobs running at once, at least 1. A job sets torch's thread count from, in order: the
`threads` config key, COREVITAL_THREADS, SLURM_CPUS_PER_TASK; else torch's default.
An OMP_NUM_THREADS set by the user is left alone (no share is computed).

A CPU job alone on its machine, with torch's default threads, may hand one of them to its
writer process (`spare_one`, after the first batch): only where the writer's share of the
work is at least SPARE and torch's last thread saves less than that share. On this
project's 2-core machine a deep model of hidden size 64 runs as fast on one thread as on two
(its ops are too small to split, and the second thread only spins), so the writer takes
that core for free; SmolLM2 runs 10-30% faster on two, so it keeps them and writes between
batches. Float results may differ in their last bits between thread counts (as between
machines); a `threads` setting pins the count and skips this.
"""

from __future__ import annotations

import logging
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


SPARE = 0.05  # a writer's share of the work below this is not worth timing torch's threads for


def _for_job(configured: int | None) -> int | None:
    """The thread count set for this job, in order: the config, the launcher's share, SLURM."""
    slurm = None if "OMP_NUM_THREADS" in os.environ else os.environ.get("SLURM_CPUS_PER_TASK")
    for value in (configured, os.environ.get(ENV), slurm):
        if value:
            return int(value)
    return None


def chosen(configured: int | None) -> bool:
    """Whether this job's thread count was chosen (config, launcher share, SLURM, OMP_NUM_THREADS)
    rather than left to torch's default."""
    return _for_job(configured) is not None or "OMP_NUM_THREADS" in os.environ


def spare_one(generate_once, worth: float) -> bool:
    """Time `generate_once()` (a short generation of the job's first batch, on a warm model)
    with one fewer of torch's threads and with all, alternately, three times each; if the
    last thread saves less than `worth` of a generation (the writer's share, which a writer
    process would take off the critical path), keep one fewer and return True."""
    import time

    import torch

    n = torch.get_num_threads()
    if n < 2:
        return False
    best = {n: float("inf"), n - 1: float("inf")}
    for _ in range(3):
        for k in (n - 1, n):
            torch.set_num_threads(k)
            clock = time.perf_counter()
            generate_once()
            best[k] = min(best[k], time.perf_counter() - clock)
    saves = 1 - best[n] / best[n - 1]
    spare = saves < worth
    torch.set_num_threads(n - 1 if spare else n)
    logging.getLogger("corevital").info(
        "torch's thread %d saves %.0f%% of a generation step, the writer would take %.0f%%: %s", n, 100 * saves,
        100 * worth, f"the writer takes its core (torch uses {n - 1})" if spare
        else "torch keeps it, the writer works between batches")
    return spare


def current() -> int:
    """torch's CPU thread count now."""
    import torch

    return torch.get_num_threads()


def apply(configured: int | None) -> int | None:
    """Set torch's thread count for this job (see the module docstring); returns it, or None."""
    import torch

    value = _for_job(configured)
    if value is not None:
        torch.set_num_threads(value)
    return value
