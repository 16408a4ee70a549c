"""Jobs: stable job-dir names, resume markers and status files.

Hydra numbers a sweep's job dirs by position, so a rerun with another override list lands in
the wrong dirs, and it keeps no record of which jobs finished. Here a job's dir is named from
its overrides (sorted, sanitised), and every job leaves two small files in it:

    status.json  what happened: running | done | failed | interrupted, with the error,
                 elapsed time, row counts, the SLURM task's ids and the tracker run. Written
                 at start and at the end, so a sweep's manifest is built from files (submitit
                 and joblib run jobs elsewhere).
    done.json    written last, only by a job that finished: the hash of its resolved config
                 and its output files. A rerun skips a job whose marker matches.

Everything is written under a temporary name and renamed (`files.atomic_write`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Iterable

from corevital.core.files import atomic_write_text
from corevital.output.writer import TRACES_DIR, trace_files

STATUS = "status.json"
DONE = "done.json"
# Overrides that change how a job runs, not what it computes: not in its dir name or hash.
NOT_IDENTITY = ("resume", "progress", "threads", "tracker")
MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@%-]+")


@functools.lru_cache(maxsize=1)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def split_override(override: str) -> tuple[str, str]:
    """(key, value) of one override, unquoted and unescaped as Hydra reads it: the sweeper
    hands a job `sink.url=http\\://h` where the command line said `sink.url=http://h`."""
    try:
        parsed = _parser().parse_overrides([override])[0]
        return parsed.get_key_element(), str(parsed.value())
    except Exception:  # not Hydra override syntax: the plain text
        key, _, value = override.partition("=")
        return key.strip(), value.strip()


def _identity(key: str) -> bool:
    """Whether an override's key is part of a job's identity (`tracker.uri` is not: NOT_IDENTITY)."""
    top = key.lstrip("+~").split(".")[0]
    return top != "hydra" and not top.startswith("hydra/") and top not in NOT_IDENTITY


def job_name(overrides: Iterable[str]) -> str:
    """The dir name of the job with these command-line overrides, e.g. `model=gpt2,seed=3`.

    Sorted by key (so the order on the command line does not matter), `hydra.*` and
    NOT_IDENTITY keys left out, characters outside [A-Za-z0-9._,=+@%-] replaced by `_`
    (`prompts=data/a.txt` -> `prompts=data_a.txt`). Names longer than 120 characters end in
    a hash of the full text. No overrides: `default`.
    """
    pairs = sorted(split_override(o) for o in overrides)
    pairs = [(k, v) for k, v in pairs if _identity(k)]
    text = ",".join(f"{k}={v}" for k, v in pairs)
    name = _UNSAFE.sub("_", text).strip("._") or "default"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 17]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return name


def config_hash(resolved: dict[str, Any], extra: str = "") -> str:
    """SHA-256 of what decides a job's outputs: its resolved config (NOT_IDENTITY keys left
    out) plus `extra` (the prompt file's contents, the schema version)."""
    identity = {k: v for k, v in resolved.items() if k not in NOT_IDENTITY}
    return hashlib.sha256((json.dumps(identity, sort_keys=True, default=str) + extra).encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(job_dir: Path, digest: str) -> bool:
    """True when `job_dir` holds a finished job with this config hash and all its outputs."""
    marker = read_json(job_dir / DONE)
    if not marker or marker.get("config_hash") != digest:
        return False
    kept = len(trace_files(job_dir / TRACES_DIR))
    return all((job_dir / f).is_file() for f in marker.get("outputs", [])) and kept == marker.get("traces", 0)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobRecord:
    """Writes one job's status and done marker."""

    def __init__(self, job_dir: Path, overrides: list[str], digest: str, slurm: dict | None = None):
        self.job_dir, self.overrides, self.digest = job_dir, overrides, digest
        self.slurm = slurm or {}  # the SLURM task's ids (slurm.ids()), in every status written
        self.tracker: dict | None = None  # the job's tracker run (trackers.Run.ref), once opened
        self.started = time.perf_counter()
        self.started_at = _now()

    def _status(self, status: str, **fields: Any) -> None:
        body = {
            "status": status,
            "name": self.job_dir.name,
            "overrides": self.overrides,
            "config_hash": self.digest,
            "started_at": self.started_at,
            "updated_at": _now(),
            "elapsed_s": round(time.perf_counter() - self.started, 3),
            **({"slurm": self.slurm} if self.slurm else {}),
            **({"tracker": self.tracker} if self.tracker else {}),
            **fields,
        }
        atomic_write_text(self.job_dir / STATUS, json.dumps(body, indent=2))

    def start(self) -> None:
        """Say running. No earlier marker or half-written file may pass for this run's output:
        the done marker goes, and files a killed job left under temporary names; the outputs
        themselves are the writer's to keep (same config: resume) or clear (writer.Store)."""
        (self.job_dir / DONE).unlink(missing_ok=True)
        for tmp in self.job_dir.rglob(".*.tmp-*"):  # left by a job killed mid-write
            tmp.unlink(missing_ok=True)
        self._status("running")

    def skipped(self) -> None:
        previous = read_json(self.job_dir / STATUS) or {}
        keep = {k: previous[k] for k in ("traces", "rows", "outputs", "warning_count") if k in previous}
        self._status("done", skipped=True, previous_elapsed_s=previous.get("elapsed_s"), **keep)

    def done(
        self,
        outputs: list[str],
        traces: int,
        rows: int,
        warnings: list[str] | None = None,
        warning_count: int = 0,
        traces_format: str = "json",
        timings: dict | None = None,
    ) -> None:
        self._status(
            "done",
            skipped=False,
            traces=traces,
            rows=rows,
            outputs=outputs,
            warnings=warnings or [],
            warning_count=warning_count,
            timings=timings or {},
        )
        marker = {
            "config_hash": self.digest,
            "outputs": outputs,
            "traces": traces if traces_format != "none" else 0,
            "finished_at": _now(),
        }
        atomic_write_text(self.job_dir / DONE, json.dumps(marker, indent=2))

    def failed(self, error: BaseException, status: str = "failed") -> None:
        self._status(status, error=f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)


def ended_elsewhere(job_dir: Path, state: str, why: str) -> None:
    """The launcher saw the job's task end without finishing (SLURM cancelled or killed it):
    its status.json, unless it says done, records that with SLURM's state."""
    previous = read_json(job_dir / STATUS) or {"name": job_dir.name}
    if previous.get("status") == "done":
        return
    status = "interrupted" if state.startswith("CANCELLED") else "failed"
    body = {**previous, "status": status, "error": why, "slurm_state": state, "updated_at": _now()}
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_dir / STATUS, json.dumps(body, indent=2))


RESOLVER = "corevital_job_name"


def register_resolver() -> None:
    """`${corevital_job_name:${hydra.overrides.task}}`, used by conf/config.yaml for
    `hydra.sweep.subdir`: each job's dir is named from its overrides."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda overrides: job_name(list(overrides)))
