"""Stopping a job between batches when the scheduler ends its task (docs/cluster.md).

SLURM ends a running task in two ways a job can prepare for:

- before its time limit, the signal sbatch's `--signal` names (submitit asks for SIGUSR2,
  `signal_delay_s` before the limit); submitit's handler then saves the job for a rerun,
  requeues it (`scontrol requeue`) and exits;
- on preemption, `scontrol requeue` or `scancel`: SIGTERM, then SIGKILL `KillWait` seconds later.

Left alone, submitit's handler exits wherever the job happens to be, mid-batch, and its
writer process (which inherits the handler) would requeue the job a second time. Under
`StopRequest` both signals only record that a stop was asked for: the job finishes the batch
in flight, raises `Stopped`, the writer commits every batch it was handed, and then `follow()`
does what the signal meant: submitit's handler (requeue) for the time-limit signal, an exit
for SIGTERM (SLURM requeues or cancels the task itself). The rerun resumes after the
committed batches (writer.Store), so every trace ends up written exactly once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Callable

TIME_LIMIT_SIGNAL = signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL changes it)
_Handler = Callable[[int, FrameType | None], object] | int | None


def time_limit_signal() -> signal.Signals:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", TIME_LIMIT_SIGNAL)


class Stopped(Exception):
    """The job stopped between batches because the scheduler asked it to (`signal` names why)."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped between batches on {signal_name}")
        self.signal_name = signal_name


class StopRequest:
    """While entered (main thread only), SIGTERM and the time-limit signal set `requested`
    instead of acting at once; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, _Handler] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, time_limit_signal()):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = self.requested or signal.Signals(signum)

    def check(self) -> None:
        """Raise Stopped if a stop was asked for: called between batches."""
        if self.requested is not None:
            raise Stopped(self.requested.name)

    def follow(self) -> None:
        """After the job committed its batches: act on the signal as it would have acted. The
        time-limit signal's previous handler (submitit's: save, requeue, exit) runs now; after
        SIGTERM, or with no handler to run, the process exits with 128 + the signal's number
        (SystemExit: submitit then records no result, and SLURM's own requeue or cancel stands)."""
        sig = self.requested
        previous = self._previous.get(sig)
        if callable(previous) and sig != signal.SIGTERM:
            previous(int(sig), None)
        raise SystemExit(128 + int(sig))
