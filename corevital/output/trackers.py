"""Experiment trackers: each job as one run in MLflow or Weights & Biases (docs/trackers.md).

`tracker=mlflow` or `tracker=wandb` opens one run per job, named by the job's dir name, before
anything is generated (a tracker that cannot be reached fails the job there, in one sentence),
and at the job's end logs:

    params     the job's overrides, each key as given on the command line
    metrics    traces, rows, generated_tokens, tokens_per_s, signal/<name> (mean over traces)
    artifact   traces.parquet

The run's reference (kind, where, id) goes into the job's status.json, so that a requeued or
resumed run of the job logs into the same tracker run and `corevital evaluate` adds its AUROC
table to it. Both packages are optional extras, imported only here and only when asked for.
Clients are used directly (MlflowClient, a wandb Run object): no global active run.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from corevital.assess.signals import SIGNALS
from corevital.core.config import ConfigError, TrackerConfig

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = ".mlflow-artifacts"  # hidden: the copies there are not job outputs (files.outputs_under)
WANDB_DIR = ".wandb"  # W&B writes its wandb/ folder in it


class TrackerError(RuntimeError):
    """A tracker that cannot be reached or written: one sentence, the job fails."""


def _missing(kind: str) -> ConfigError:
    """The package `kind` (mlflow, wandb) is not installed: its extra has the same name."""
    return ConfigError(f"tracker={kind} needs the {kind} package: pip install 'corevital[{kind}]'")


def _named(value: str | None, home: Path) -> str:
    """The experiment (MLflow) or project (W&B): as set, else the sweep (or run) dir's name."""
    return value or home.absolute().name


@dataclass
class Run:
    """One job's tracker run: `ref` (JSON-able) finds it again; `log` and `end` write to it."""

    kind: str
    ref: dict[str, Any]
    client: Any

    def log(self, metrics: dict[str, float], artifacts: list[Path], tables: dict[str, Path] | None = None) -> None:
        """Log the finite `metrics` (trackers take no NaN), the `artifacts` files, and each of
        `tables` under its folder name."""
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        try:
            (_mlflow_log if self.kind == "mlflow" else _wandb_log)(self, finite, artifacts, tables or {})
        except Exception as e:
            raise TrackerError(f"could not log to the {self.kind} run {self.ref.get('run_id')}: {_why(e)}") from None

    def end(self, ok: bool) -> None:
        try:
            if self.kind == "mlflow":
                self.client.set_terminated(self.ref["run_id"], status="FINISHED" if ok else "FAILED")
            else:
                self.client.finish(exit_code=0 if ok else 1)
        except Exception as e:
            raise TrackerError(f"could not close the {self.kind} run {self.ref.get('run_id')}: {_why(e)}") from None


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def open_run(cfg: TrackerConfig, home: Path, name: str, params: dict[str, str], previous: dict | None = None):
    """The job's run (None for tracker=none). `home` is the sweep dir (run dir for one job): the
    default MLflow store and W&B folder live there. `previous`: the ref an earlier run of this
    job left in its status.json; the same tracker run is used again when it points there."""
    if cfg.type == "none":
        return None
    try:
        if cfg.type == "mlflow":
            return _mlflow_open(cfg, home, name, params, previous)
        return _wandb_open(cfg, home, name, params, previous)
    except ConfigError:  # the package is missing
        raise
    except Exception as e:
        raise TrackerError(f"tracker={cfg.type} could not be reached ({_where(cfg, home)}): {_why(e)}") from None


def reopen(ref: dict) -> Run:
    """The run `ref` names (from a job's status.json), for `corevital evaluate`."""
    cfg = TrackerConfig(type=ref["kind"], uri=ref.get("uri"), experiment=ref.get("experiment"),
                        project=ref.get("project"), mode=ref.get("mode", "offline"))  # fmt: skip
    run = open_run(cfg, Path(ref.get("home", ".")), ref["name"], {}, previous=ref)
    if run is None or run.ref["run_id"] != ref["run_id"]:
        raise TrackerError(f"the {ref['kind']} run {ref['run_id']} is gone")
    return run


def _where(cfg: TrackerConfig, home: Path) -> str:
    if cfg.type == "mlflow":
        return f"tracker.uri={mlflow_uri(cfg, home)}"
    return f"tracker.project={_named(cfg.project, home)}, tracker.mode={cfg.mode}"


# ---- MLflow -------------------------------------------------------------------------------
def mlflow_uri(cfg: TrackerConfig, home: Path) -> str:
    return cfg.uri or f"sqlite:///{(home / MLFLOW_DB).absolute()}"


def _mlflow_open(cfg: TrackerConfig, home: Path, name: str, params: dict[str, str], previous: dict | None) -> Run:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an unreachable server: seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise _missing("mlflow") from None
    uri, experiment = mlflow_uri(cfg, home), _named(cfg.experiment, home)
    client = MlflowClient(tracking_uri=uri)
    found = _mlflow_experiment(client, uri, experiment, home)
    ref = {"kind": "mlflow", "uri": uri, "experiment": experiment, "name": name, "home": str(home.absolute())}
    same = previous and [previous.get(k) for k in ("kind", "uri", "experiment")] == ["mlflow", uri, experiment]
    if same:
        run_id = previous["run_id"]
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(found.experiment_id, run_name=name, tags={"corevital.job": name}).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return Run("mlflow", {**ref, "run_id": run_id}, client)


def _mlflow_experiment(client, uri: str, experiment: str, home: Path):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:  # the artifacts next to the store for a local one (MLflow's default is the cwd's mlruns/)
            where = (home / MLFLOW_ARTIFACTS).absolute().as_uri() if uri.startswith("sqlite:") else None
            client.create_experiment(experiment, artifact_location=where)
        except Exception:  # another job of the sweep created it first
            pass
        found = client.get_experiment_by_name(experiment)
    return found


def prepare(cfg: TrackerConfig, home: Path) -> None:
    """Before a sweep's jobs start (the launching process): create the MLflow store and
    experiment once, rather than in every job at once (a local sqlite store is created by
    migrations that must not run twice side by side). Errors are left for the jobs to report."""
    if cfg.type != "mlflow":
        return
    try:
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(cfg, home)
        _mlflow_experiment(MlflowClient(tracking_uri=uri), uri, _named(cfg.experiment, home), home)
    except Exception:
        pass


def _mlflow_log(run: Run, metrics: dict[str, float], artifacts: list[Path], tables: dict[str, Path]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.client.log_batch(run.ref["run_id"], metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    for path in artifacts:
        run.client.log_artifact(run.ref["run_id"], str(path))
    for folder, path in tables.items():
        run.client.log_artifact(run.ref["run_id"], str(path), artifact_path=folder)


# ---- Weights & Biases ---------------------------------------------------------------------
def _wandb_open(cfg: TrackerConfig, home: Path, name: str, params: dict[str, str], previous: dict | None) -> Run:
    try:
        import wandb
    except ImportError:
        raise _missing("wandb") from None
    folder = (home / WANDB_DIR).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    project = _named(cfg.project, home)
    same = previous and previous.get("kind") == "wandb" and previous.get("project") == project
    run = wandb.init(
        project=project,
        name=name,
        mode=cfg.mode,
        dir=str(folder),
        config=params,
        id=previous["run_id"] if same else None,
        resume="allow" if same else None,
        # no system metrics, code, git state, requirements or host metadata: only what is logged here
        settings=wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            x_disable_meta=True,
            save_code=False,
            disable_git=True,
            x_save_requirements=False,
        ),  # fmt: skip
        reinit="create_new",
    )
    ref = {"kind": "wandb", "project": run.project, "mode": cfg.mode, "name": name, "home": str(home.absolute())}
    return Run("wandb", {**ref, "run_id": run.id, "dir": run.dir}, run)


def _wandb_log(run: Run, metrics: dict[str, float], artifacts: list[Path], tables: dict[str, Path]) -> None:
    import wandb

    run.client.summary.update(metrics)
    for kind, paths in (("traces", artifacts), ("evaluation", list(tables.values()))):
        if paths:
            artifact = wandb.Artifact(f"{kind}-{run.ref['run_id']}", type=kind)
            for path in paths:
                artifact.add_file(str(path))
            run.client.log_artifact(artifact)


# ---- what a job logs ----------------------------------------------------------------------
def job_metrics(traces_parquet: Path, traces: int, rows: int, generate_s: float) -> dict[str, float]:
    """The metrics of a finished job: counts, speed, and each per-trace signal's mean (NaN-free)."""
    names = [s.name for s in SIGNALS]
    present = [n for n in names if n in pq.read_schema(traces_parquet).names]
    table = pq.read_table(traces_parquet, columns=present)
    generated = int(sum(v for v in table.column("generated_tokens").to_pylist() if v is not None))
    out = {
        "traces": float(traces),
        "rows": float(rows),
        "generated_tokens": float(generated),
        "tokens_per_s": generated / generate_s if generate_s > 0 else float("nan"),
    }
    for name in present:
        values = [float(v) for v in table.column(name).to_pylist() if v is not None and math.isfinite(float(v))]
        out[f"signal/{name}"] = sum(values) / len(values) if values else float("nan")
    return out
