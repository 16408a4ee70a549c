"""One writer per job dir: an exclusive advisory lock on `<job dir>/.lock`.

A sweep launched twice, or a requeued array task, must not write one job dir from two
processes. The lock is `fcntl.flock` on a file in the job dir: the kernel releases it when
its process ends, however it ends (SIGKILL included), so a lock whose process is gone is
simply taken by the next run. On Linux, flock on NFS is carried by NFS byte-range locks, so
it also holds between nodes of a cluster. The file records who holds it, for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK = ".lock"


class JobLocked(RuntimeError):
    """The job dir is being written by another live process; the message names it."""


@contextlib.contextmanager
def job_lock(job_dir: Path):
    """Hold the job dir's lock for the block, or raise JobLocked at once."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        os.close(fd)
        raise JobLocked(
            f"the job dir {job_dir} is being written by {holder}; wait for it to finish, "
            f"or write elsewhere (hydra.run.dir=..., hydra.sweep.dir=...)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            ).encode(),
        )
        yield
    finally:
        os.close(fd)  # releases the lock


def held(job_dir: Path) -> bool:
    """Whether a live process holds the job dir's lock now."""
    try:
        fd = os.open(job_dir / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"
