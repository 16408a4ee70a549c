"""Where a job's writer runs: in a forked worker process beside generation, or inline on the
generating thread between batches. A runner's decision (it knows the device, the launcher's
thread share and the user's `threads`), handed to the writer (output/writer.py) as its mode."""

from __future__ import annotations

import os
from typing import Callable

from corevital.output import background
from corevital.runner import threads


def writer_mode(device, batches: int, threads_chosen: bool, share: float, spare_core: Callable[[float], bool]) -> str:
    """Where the writer runs: "process" (a forked worker, overlapped with generation) or
    "inline" (on the generating thread, between batches). `share`: the writer's estimated
    time over generation's (the first batch's rows x COST_PER_ROW over its seconds).
      - a job of one batch, or no fork (Windows): inline, there is nothing to overlap;
      - beside an accelerator: process;
      - on the CPU, under a launcher's thread share or a chosen thread count: inline (the
        other cores are other jobs', or the user's);
      - on the CPU, where torch leaves a core free (threads=1 of 2, say): process;
      - on the CPU with torch's default threads, where the writer's share is at least
        threads.SPARE: process if `spare_core(share)` (threads.StepTrial) finds torch's last
        thread saves less than that share, and takes it. Otherwise inline: a busy writer beside torch
        threads on every core slows generation more than it saves.
    COREVITAL_WRITER=process|inline decides instead."""
    fixed = _fixed_mode(device, batches, threads_chosen)
    if fixed is not None:
        return fixed
    return "process" if share >= threads.SPARE and spare_core(share) else "inline"


def asks_threads(device, batches: int, threads_chosen: bool) -> bool:
    """Whether writer_mode's answer depends on timing torch's last thread (so the first batch
    is generated under a threads.StepTrial)."""
    return _fixed_mode(device, batches, threads_chosen) is None


def _fixed_mode(device, batches: int, threads_chosen: bool) -> str | None:
    """writer_mode's answer where the writer's share and torch's threads do not decide it."""
    forced = os.environ.get("COREVITAL_WRITER")
    if forced in ("process", "inline"):
        return forced if background.available() else "inline"
    if batches < 2 or not background.available():
        return "inline"
    if device.type != "cpu":
        return "process"
    if os.environ.get(threads.ENV):
        return "inline"
    if threads.cores() > threads.current():
        return "process"
    return "inline" if threads_chosen or threads.current() < 2 else None
