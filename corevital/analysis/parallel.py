"""Work shared out over worker processes, one per core (joblib's loky processes: reused between
calls, started without fork's hazards, and each limited to one BLAS / OpenMP thread so that two
workers on two cores do not fight over them).

evaluate's two heavy steps are independent pieces: reading the jobs' rows chunk by chunk
(features.py) and fitting each detector and layer probe out of fold (fitted.py). Python holds
one core per process, so the pieces run in processes, not threads.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence


def workers() -> int:
    """Worker processes to use: the cores this process may run on (cgroup and affinity limits
    included)."""
    from joblib import cpu_count

    return max(1, cpu_count())


def run(fn: Callable, tasks: Iterable[tuple], workers: int) -> list:
    """[fn(*task) for task in tasks], in order; in `workers` processes when there are two or more
    of both, in this process otherwise. fn must be a module-level function (it is pickled). A
    generator of tasks is drawn from only as workers come free, so its tasks are built (and
    held) a few at a time."""
    if workers < 2 or (isinstance(tasks, Sequence) and len(tasks) < 2):
        return [fn(*task) for task in tasks]
    from joblib import Parallel, delayed

    n = min(workers, len(tasks)) if isinstance(tasks, Sequence) else workers
    return Parallel(n_jobs=n, batch_size=1, pre_dispatch="n_jobs")(delayed(fn)(*task) for task in tasks)


def warm(workers: int) -> Callable[[], None]:
    """Start `workers` processes in a background thread, while this process does other work
    (their start, imports included, takes seconds); returns the function that waits until they
    are up. Nothing is started for fewer than two."""
    if workers < 2:
        return lambda: None
    thread = threading.Thread(target=run, args=(_ready, [()] * workers, workers), daemon=True)
    thread.start()
    return thread.join


def _ready() -> None:
    """In a worker: import what the tasks will use, so that the first task does not wait for it."""
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import sklearn.linear_model  # noqa: F401
