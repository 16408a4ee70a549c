"""C kernels compiled at first use: `library("fused.c")` -> a ctypes library, or None.

Each C file (beside the Python module that wraps it) is compiled once per machine with the system C compiler
(`cc`, or $CC) into the cache folder (files.cache_dir("kernels"), per user by default), keyed
by its source, the flags and the CPU, written atomically (parallel jobs, or nodes sharing a
filesystem, may race to build it) and loaded with ctypes. Where no compiler works, or
COREVITAL_FUSED=0, it is None and the caller uses its Python or torch fallback, which the
tests check against the same reference.

Loading a shared library runs its code, so the cache is trusted only as far as its
permissions allow (docs/capture.md, "Compiled kernels"):

- a cache folder that someone other than its owner can write to (a group scratch dir), or
  that another user owns, is not used: one warning, and the kernels are compiled into a
  private temporary folder of this process instead;
- a library is loaded only if it belongs to this user, is writable by nobody else, and its
  SHA-256 equals the one recorded beside it when it was compiled; otherwise it is compiled
  again (a partial, foreign or replaced file is never loaded);
- the key holds the CPU's full description (x86 `flags`, aarch64 `Features`, the model and
  implementer lines of every core), so a node of another kind never loads a `-march=native`
  build made for a different core.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import stat
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from corevital.core.files import atomic_write, atomic_write_text, cache_dir

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
# /proc/cpuinfo lines that say what -march=native may use: x86 (flags, model), aarch64 (Features,
# implementer and part), POWER and RISC-V (cpu, isa, uarch). Clock and core numbers are left out.
CPU_KEYS = (
    "flags",
    "features",
    "vendor_id",
    "cpu family",
    "model",
    "model name",
    "stepping",
    "cpu implementer",
    "cpu architecture",
    "cpu variant",
    "cpu part",
    "cpu revision",
    "cpu",
    "isa",
    "uarch",
)


def cpu_signature(cpuinfo: str, machine: str) -> str:
    """What -march=native compiled for, from /proc/cpuinfo's text: every distinct value of the
    CPU_KEYS lines over all cores (a big.LITTLE machine has two kinds), and the machine name."""
    seen = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in CPU_KEYS:
            seen.add(f"{key.strip().lower()}={' '.join(value.split())}")
    return "\n".join([machine, *sorted(seen)])


def _this_cpu() -> str:
    """(Not platform.processor(): on Linux it forks `uname -p`, a copy of the whole job process.)"""
    try:
        return cpu_signature(Path("/proc/cpuinfo").read_text(), platform.machine())
    except OSError:
        return platform.machine()


def private(path: Path) -> bool:
    """Whether `path` belongs to this user and nobody else can write to it."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


@cache
def _instead_of(folder: Path) -> Path:
    """This process's private temporary folder (mode 0700) in place of an unsafe `folder`; warns once."""
    log.warning(
        "the kernel cache %s can be written by other users, so a library there could run their code; "
        "compiling into a private temporary folder instead (point COREVITAL_CACHE_DIR at a folder only you "
        "can write)",
        folder,
    )
    return Path(tempfile.mkdtemp(prefix="corevital-kernels-"))


def kernel_dir() -> Path:
    """The cache folder for compiled kernels, or a private temporary one when the cache folder
    could be written by someone other than this user."""
    folder = cache_dir("kernels")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder if private(folder) and private(folder.parent) else _instead_of(folder)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(so: Path) -> bool:
    """A compiled library that may be loaded: ours, writable only by us, and the bytes recorded."""
    record = so.with_name(so.name + ".sha256")
    try:
        return private(so) and private(record) and record.read_text().strip() == _sha256(so)
    except OSError:
        return False


def _compile(compiler: str, source: Path, so: Path) -> None:
    atomic_write(
        so,
        lambda tmp: subprocess.run(
            [compiler, *FLAGS, "-o", str(tmp), str(source), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ),
    )
    atomic_write_text(so.with_name(so.name + ".sha256"), _sha256(so))


@cache
def library(source: Path) -> ctypes.CDLL | None:
    """The compiled library of the C file at `source` (beside its Python wrapper), or None (one warning)."""
    if os.environ.get("COREVITAL_FUSED", "1") == "0":
        return None
    name = source.name
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *FLAGS, _this_cpu()]).encode()).hexdigest()[:16]
    try:
        so = kernel_dir() / f"{source.stem}-{key}.so"
        if not _verified(so):
            _compile(compiler, source, so)
            if not _verified(so):  # replaced between our write and this read
                raise OSError(f"{so} changed after it was compiled")
        return ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("C kernels of %s unavailable (%s); using the slower fallback", name, detail)
        return None
