"""Hydra callbacks, run in the process that launches the jobs (conf/config.yaml lists them).

OutputDirCheck: before anything runs, the run or sweep dir must be creatable and writable,
so that a bad `hydra.run.dir` is one sentence, not Hydra's traceback.
ThreadShare: before a sweep under a local parallel launcher, each job's share of the cores.
TrackerSetup: before a sweep with tracker=mlflow, its store and experiment.
ManifestCallback: after a sweep, `manifest.json` and a non-zero exit naming failed jobs.
Hydra turns a callback's exceptions into warnings; only SystemExit stops it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from corevital.core.config import TrackerConfig
from corevital.output import trackers
from corevital.runner import threads
from corevital.runner.manifest import MANIFEST, sweep_jobs, write_manifest


def check_writable(directory: Path) -> None:
    """Create `directory` and write a file in it, or exit 2 with one sentence saying why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".corevital-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(
            f"corevital: error: cannot write the output dir {directory} ({e.strerror or e}); "
            f"choose another with hydra.run.dir=... (hydra.sweep.dir=... for -m)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(Path(config.hydra.sweep.dir))


class ThreadShare(Callback):
    """Jobs that a local launcher runs side by side get cores / concurrent jobs threads each
    (threads.py), passed to their processes in COREVITAL_THREADS."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        n = threads.share(config.hydra.launcher, len(sweep_jobs(config)))
        if n is not None:
            os.environ[threads.ENV] = str(n)


class TrackerSetup(Callback):
    """tracker=mlflow: the store and experiment exist before the sweep's jobs start (trackers.prepare)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        cfg = TrackerConfig(**OmegaConf.to_container(config.tracker, resolve=True))
        trackers.prepare(cfg, Path(config.hydra.sweep.dir))


class ManifestCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        manifest = write_manifest(config)
        bad = [e for e in manifest["jobs"] if e["status"] != "done"]
        where = Path(manifest["sweep_dir"]) / MANIFEST
        if not bad:
            print(f"corevital: {len(manifest['jobs'])} job(s) done; manifest: {where}")
            return
        print(
            f"corevital: {len(bad)} of {len(manifest['jobs'])} job(s) did not finish; manifest: {where}",
            file=sys.stderr,
        )
        for e in bad:
            why = e.get("error") or ("being written by another process" if e["status"] == "running" else "")
            print(f"  {e['name']}: {e['status']}{': ' + why if why else ''}", file=sys.stderr)
        raise SystemExit(1)
