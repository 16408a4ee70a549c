"""Each job's share of the CPU cores.

torch starts one compute thread per core in every process. Jobs that run side by side on
one machine (Hydra's submitit_local and joblib launchers) then fight over the cores, and two
such jobs on 2 cores ran 17x slower than one alone. So the process that launches a sweep
(`callbacks.ThreadShare`) puts each job's share in COREVITAL_THREADS: the cores over the
jobs running at once, at least 1. A job sets torch's thread count from, in order: the
`threads` config key, COREVITAL_THREADS, SLURM_CPUS_PER_TASK; else torch's default.
An OMP_NUM_THREADS set by the user is left alone (no share is computed).

A CPU job alone on its machine, with torch's default threads, may hand one of them to its
writer process (`StepTrial`, timed on the first batch's decode steps): only where the writer's share of the
work is at least SPARE and torch's last thread saves less than that share. On a
2-core machine a deep model of hidden size 64 can run as fast on one thread as on two
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


MIN_STEPS = 4  # decode steps timed at each thread count before the trial decides


class StepTrial:
    """Whether torch's last thread is worth more than a writer process, timed on the job's own
    first batch: called after each generated token (generate's `on_step`), it alternates
    torch's thread count between all and one fewer from one decode step to the next and
    times each step (the first decode step, a warm-up, is not counted). Alternating steps of
    one generation see the same model, batch and cache length, so they compare like with
    like; each count's fastest step is compared (on a shared VM, noise only adds: the
    medians of nine steps each flipped the answer from run to run, the minima did not),
    and no extra generation is run (timing three short ones at each count cost
    about 2 s of a job on a 2-core CPU). `writer_s_per_step`: the writer's estimated
    time for one decode step's rows; where the first decode step shows that to be under half of
    SPARE (SmolLM2 at batch 8: about 1%), the trial stops and torch keeps every thread."""

    def __init__(self, writer_s_per_step: float = float("inf")):
        import torch

        self.n = torch.get_num_threads()
        self.steps: dict[int, list[float]] = {self.n - 1: [], self.n: []}
        self.writer_s_per_step = writer_s_per_step  # the writer's estimated seconds per decode step's rows
        self.stopped = False
        self._calls, self._last = 0, 0.0

    def __call__(self) -> None:
        import time

        import torch

        now = time.perf_counter()
        if self.stopped:
            return
        if self._calls == 1 and self.writer_s_per_step < SPARE / 2 * (now - self._last):
            self.stopped = True  # the writer's share is too small to be worth a core: no trial
            torch.set_num_threads(self.n)
            return
        if self._calls > 1:
            self.steps[torch.get_num_threads()].append(now - self._last)
        self._calls += 1
        torch.set_num_threads(self.n - self._calls % 2)
        self._last = time.perf_counter()

    def enough(self) -> bool:
        return min(len(v) for v in self.steps.values()) >= MIN_STEPS

    def end(self) -> None:
        """After the generation: torch's thread count as it was."""
        import torch

        torch.set_num_threads(self.n)

    def spare(self, worth: float) -> bool:
        """If torch's last thread saves less than `worth` of a decode step (the writer's share,
        which a writer process would take off the critical path), keep one fewer and return
        True. Too few steps timed (a short generation): keep them all."""
        import torch

        if not self.enough():
            return False
        best = {k: min(v) for k, v in self.steps.items()}
        saves = 1 - best[self.n] / best[self.n - 1]
        spare = saves < worth
        torch.set_num_threads(self.n - 1 if spare else self.n)
        logging.getLogger("corevital").info(
            "torch's thread %d saves %.0f%% of a decode step, the writer would take %.0f%%: %s",
            self.n,
            100 * saves,
            100 * worth,
            f"the writer takes its core (torch uses {self.n - 1})"
            if spare
            else "torch keeps it, the writer works between batches",
        )
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
