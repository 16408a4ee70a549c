"""Files: atomic writes (a reader never sees half a file: temporary name in the same dir, then
rename), and the cache folder for what CoreVital builds once per machine."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary sibling of `path`, then rename it over `path`. The
    temporary name holds the host and the pid: processes on two nodes of a shared filesystem
    may have the same pid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{temp_suffix()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_suffix() -> str:
    """host-pid: unique among the processes of every node that may share a folder."""
    return f"{socket.gethostname()}-{os.getpid()}"


def cache_dir(kind: str) -> Path:
    """$COREVITAL_CACHE_DIR/<kind>, else ~/.cache/corevital/<kind>: converted models ("models"),
    model hashes ("hashes"), compiled kernels ("kernels")."""
    env = os.environ.get("COREVITAL_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "corevital") / kind


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def outputs_under(root: Path, name: str) -> list[Path]:
    """Every file called `name` under `root`, sorted, except inside hidden folders (`.submitit/`,
    a tracker's `.mlflow-artifacts/` and `.wandb/`): those hold logs and copies, not job outputs."""
    return sorted(p for p in root.rglob(name) if not any(part.startswith(".") for part in p.relative_to(root).parts))
