"""Debian packages the tests need (Chromium, SLURM, MariaDB), installed through apt-get when
they are missing and the tests run as root; else the caller skips with one line saying how to
get them, or fails under CI=true, where every tier must run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def have(binary: str) -> str | None:
    """The path of `binary` on PATH or in the sbin dirs (daemons live there), or None."""
    found = shutil.which(binary)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        if (Path(folder) / binary).is_file():
            return str(Path(folder) / binary)
    return None


def ensure(binaries: list[str], packages: list[str]) -> bool:
    """True when every binary is there, after installing `packages` if some are missing and we can."""
    if all(have(b) for b in binaries):
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, capture_output=True, env=env, timeout=1200).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        subprocess.run(install, capture_output=True, env=env, timeout=1200)
    return all(have(b) for b in binaries)


def skip_or_fail(message: str) -> None:
    """Skip with `message`, except under CI=true, where a missing component fails the run."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
