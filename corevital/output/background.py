"""A worker in a child process: the job's writer, off the generating process.

    generating process                      worker process (forked from it)
    put(item) ──▶ bounded queue (QUEUE) ──▶ handle(item), item after item
    failed()  ◀── error pipe            ◀── the first error, as one sentence; then it exits
    finish()  ──▶ stop                  ──▶ close() ──▶ its result, back through the pipe

Why a process and not a thread: rendering and writing a batch is Python work, and a thread
holds the GIL the generating loop (Python around each layer) needs; a process runs on a core
of its own. The child is forked, so it starts in milliseconds with the parent's modules,
model metadata and vocabulary already in memory (copy-on-write); it never touches torch.

The child dies with its parent (PR_SET_PDEATHSIG on Linux; elsewhere it notices within a
second): a job killed at any moment loses at most the batch in flight, whose files are still
under temporary names. It ignores SIGINT: on Ctrl-C the parent decides, and `abort` lets the
child commit what was queued before it stops.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
from typing import Any, Callable

QUEUE = 2  # items waiting for the worker: enough to overlap, bounded memory
_STOP, _ABORT = "stop", "abort"


def available() -> bool:
    """Whether a worker process can be forked here (not on Windows)."""
    return hasattr(os, "fork") and "fork" in multiprocessing.get_all_start_methods()


class WorkerError(RuntimeError):
    """The worker failed; the message is its error's, one sentence."""


class Background:
    """Run `handle(item)` for each `put` item in a forked child, then `close()` on `finish`.

    `handle` and `close` raise WorkerError(sentence) to fail the job; anything else the child
    raises is reported as "<type>: <message>". `abort()` (the parent is failing or was
    interrupted) lets the child handle what was queued and waits for it. `cleanup()` runs in
    the child whenever it stops without closing (abort, or its own error).
    """

    def __init__(self, handle: Callable[[Any], None], close: Callable[[], Any], cleanup: Callable[[], None]):
        ctx = multiprocessing.get_context("fork")
        self._handle, self._close, self._cleanup = handle, close, cleanup
        self._items = ctx.Queue(maxsize=QUEUE)
        self._replies, self._reply_end = ctx.Pipe(duplex=False)  # child -> parent
        self._process = ctx.Process(target=self._child, args=(os.getpid(),), name="corevital-writer", daemon=True)
        self.error: str | None = None

    def start(self) -> "Background":
        self._process.start()
        self._reply_end.close()  # the child's end, in the parent
        return self

    # --- parent --------------------------------------------------------------------------
    def failed(self) -> bool:
        """Whether the worker reported an error (cheap: one poll of a pipe; called every step)."""
        self._read_error()
        return self.error is not None

    def put(self, item: Any) -> None:
        """Queue `item`, waiting while QUEUE items wait; raises WorkerError once the worker failed."""
        while True:
            self._raise()
            try:
                self._items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> Any:
        """Let the worker handle everything queued, close, and exit; returns close()'s result."""
        self.put(_STOP)
        return self._wait_for_result()

    def abort(self, timeout: float = 120.0) -> None:
        """The parent is failing: the worker handles what is queued, cleans up, and exits."""
        if self._process.is_alive():
            try:
                self._items.put(_ABORT, timeout=timeout)
                self._process.join(timeout)
            except queue.Full:
                pass
            if self._process.is_alive():
                self._process.kill()
        self._items.cancel_join_thread()  # items the worker will never read must not hold up our exit

    def _read_error(self) -> None:
        while self.error is None and self._result is None and self._replies.poll():
            try:
                kind, value = self._replies.recv()
            except EOFError:  # the child is gone without a word (killed, crashed)
                self._process.join(5)
                self.error = self._ended()
                return
            if kind == "error":
                self.error = value
            else:
                self._result = (kind, value)

    def _raise(self) -> None:
        self._read_error()
        if self.error is None and self._result is None and not self._process.is_alive() and not self._replies.poll():
            self.error = self._ended()
        if self.error is not None:
            self._items.cancel_join_thread()  # items the worker will never read must not hold up our exit
            raise WorkerError(self.error)

    _result: tuple | None = None

    def _ended(self) -> str:
        return f"the writer process ended unexpectedly (exit code {self._process.exitcode})"

    def _wait_for_result(self) -> Any:
        while self._result is None:
            self._raise()
            self._replies.poll(0.1)
        self._process.join()
        return self._result[1]

    # --- child ---------------------------------------------------------------------------
    def _child(self, parent: int) -> None:
        # Ctrl-C and the scheduler's signals are the parent's to act on (runner/stopping.py):
        # it hands over what to commit and then aborts or finishes this process
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        _die_with_parent()
        self._replies.close()  # the parent's end, in the child
        reply = self._reply_end
        try:
            while True:
                item = self._next(parent)
                if item == _ABORT:
                    self._cleanup()
                    return
                if item == _STOP:
                    reply.send(("done", self._close()))
                    return
                self._handle(item)
        except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the job
            self._cleanup()
            reply.send(("error", str(e) if isinstance(e, WorkerError) else f"{type(e).__name__}: {e}"))
        finally:
            sys.stdout.flush(), sys.stderr.flush()

    def _next(self, parent: int) -> Any:
        while True:
            try:
                return self._items.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the parent died (where PR_SET_PDEATHSIG is not)
                    os._exit(1)


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
