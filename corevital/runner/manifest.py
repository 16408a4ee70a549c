"""Manifest: the sweep's end-of-run record, `<sweep dir>/manifest.json`.

Written in the process that launched the sweep (`callbacks.ManifestCallback`): it expands
the sweep's overrides the way Hydra's basic sweeper does and reads each job's `status.json`
(jobs may have run in other processes or on other nodes: submitit, joblib), so it is written
even when jobs failed (every job runs to its end and records its failure).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from corevital.core.files import atomic_write_text
from corevital.core.lock import held
from corevital.runner.jobs import STATUS, job_name, read_json

MANIFEST = "manifest.json"


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's override list, as Hydra's basic sweeper makes them (sweeper params first)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = config.hydra.sweeper.get("params") or {}
    params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else dict(params)
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def job_entry(sweep_dir: Path, overrides: list[str]) -> dict[str, Any]:
    name = job_name(overrides)
    status = read_json(sweep_dir / name / STATUS) or {"status": "missing"}
    if held(sweep_dir / name):  # another live process writes it (this sweep's own jobs have ended)
        status = {**status, "status": "running"}
    elif status["status"] == "running":  # the process running it died (killed, out of memory)
        status = {**status, "status": "incomplete"}
    keep = (
        "status", "skipped", "error", "elapsed_s", "traces", "rows", "outputs", "warnings", "updated_at", "slurm",
        "slurm_state",
    )  # fmt: skip
    return {
        "name": name,
        "dir": str(sweep_dir / name),
        "overrides": overrides,
        **{k: status[k] for k in keep if k in status},
    }


def write_manifest(config: DictConfig) -> dict[str, Any]:
    sweep_dir = Path(config.hydra.sweep.dir).absolute()
    entries = [job_entry(sweep_dir, o) for o in sweep_jobs(config)]
    counts: dict[str, int] = {}
    for e in entries:
        key = "skipped" if e.get("skipped") else e["status"]
        counts[key] = counts.get(key, 0) + 1
    manifest = {
        "sweep_dir": str(sweep_dir),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "overrides": list(config.hydra.overrides.task),
        "counts": counts,
        "jobs": entries,
    }
    atomic_write_text(sweep_dir / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
