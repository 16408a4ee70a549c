"""Hydra callbacks, run in the process that launches the jobs (conf/config.yaml lists them).

OutputDirCheck: before anything runs, the run or sweep dir must be creatable and writable,
so that a bad `hydra.run.dir` is one sentence, not Hydra's traceback.
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

from corevital.manifest import MANIFEST, write_manifest


def check_writable(directory: Path) -> None:
    """Create `directory` and write a file in it, or exit 2 with one sentence saying why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".corevital-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(f"corevital: error: cannot write the output dir {directory} ({e.strerror or e}); "
              f"choose another with hydra.run.dir=... (hydra.sweep.dir=... for -m)", file=sys.stderr)
        raise SystemExit(2) from None


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(Path(config.hydra.sweep.dir))


class ManifestCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        manifest = write_manifest(config)
        bad = [e for e in manifest["jobs"] if e["status"] != "done"]
        where = Path(manifest["sweep_dir"]) / MANIFEST
        if not bad:
            print(f"corevital: {len(manifest['jobs'])} job(s) done; manifest: {where}")
            return
        print(f"corevital: {len(bad)} of {len(manifest['jobs'])} job(s) did not finish; manifest: {where}", file=sys.stderr)
        for e in bad:
            print(f"  {e['name']}: {e['status']}{': ' + e['error'] if e.get('error') else ''}", file=sys.stderr)
        raise SystemExit(1)
