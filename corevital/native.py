"""C kernels compiled at first use: `library("fused.c")` -> a ctypes library, or None.

Each C file beside this module is compiled once per machine with the system C compiler
(`cc`, or $CC) into the cache folder (files.cache_dir("kernels")), keyed by its source, the
flags and the CPU, written atomically (parallel jobs may race to build it) and loaded with
ctypes. Where no compiler works, or COREVITAL_FUSED=0, it is None and the caller uses its
Python or torch fallback, which the tests check against the same reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
from functools import cache
from pathlib import Path

from corevital.files import atomic_write, cache_dir

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]


def _cpu_signature() -> str:
    """What -march=native compiled for: a shared cache folder may serve several kinds of node.
    (Not platform.processor(): on Linux it forks `uname -p`, a copy of the whole job process.)"""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), "") + platform.machine()
    except OSError:
        return platform.machine()


def _compile(compiler: str, source: Path, so: Path) -> None:
    atomic_write(so, lambda tmp: subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(source), "-lm"], check=True,
                                                 capture_output=True, text=True, timeout=120))


@cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled library of the C file `name` beside this module, or None (one warning)."""
    if os.environ.get("COREVITAL_FUSED", "1") == "0":
        return None
    source = Path(__file__).with_name(name)
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    so = cache_dir("kernels") / f"{source.stem}-{key}.so"
    try:
        if not so.exists():
            _compile(compiler, source, so)
        return ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("C kernels of %s unavailable (%s); using the slower fallback", name, detail)
        return None
