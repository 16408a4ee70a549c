"""The `corevital` command: the seed project's command line on top of the Hydra app.

    corevital run --model gpt2 --prompt "..." --max_new_tokens 50 --device auto --seed 42 \\
                  --temperature 0.8 --top_k 50 --top_p 0.95 --out PATH --remote_sink http --remote_url URL
    corevital validate PATH...     check traces (.json, .json.gz, or every trace under a dir) against the JSON Schema
    corevital schema               print the trace JSON Schema
    corevital view PATH...         the interactive viewer of every trace (docs/view.md); --bundle OUT: a static copy
    corevital report DIR           the viewer's static bundle of DIR's first traces, in DIR/report/
    corevital evaluate DIR         grade the traces against the prompt file's answers; rank the signals (evaluate.py)

`run` turns its flags into the equivalent Hydra overrides and runs `python -m corevital.run`
in this process; Hydra overrides may follow the flags (`corevital run --seed 1 batch_size=4`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from corevital.core import config as schema
from corevital.core.config import quote_value


def json_job_dir(json_out: Path) -> Path:
    """With `--out FILE.json`, the job's other files go to FILE.corevital/."""
    return json_out.with_name(json_out.stem + ".corevital")


def model_override(model: str) -> str:
    """`gpt2` names conf/model/gpt2.yaml; anything else is a hub id or a path."""
    options = {p.stem for p in (Path(schema.config_dir()) / "model").glob("*.yaml")}
    return f"model={model}" if model in options else f"model.name_or_path={quote_value(model)}"


def run_overrides(a: argparse.Namespace) -> tuple[list[str], Path | None]:
    """The Hydra overrides for `corevital run`'s flags, and the .json file `--out` names (if it does)."""
    out: list[str] = []
    if a.model is not None:
        out.append(model_override(a.model))
    if a.prompt is not None:
        out.append(f"prompt={quote_value(a.prompt)}")
    for flag, key in (
        ("max_new_tokens", "sampling.max_new_tokens"),
        ("temperature", "sampling.temperature"),
        ("top_k", "sampling.top_k"),
        ("top_p", "sampling.top_p"),
        ("seed", "seed"),
        ("device", "device"),
    ):
        if getattr(a, flag) is not None:
            out.append(f"{key}={getattr(a, flag)}")
    if a.remote_sink == "http":
        if not a.remote_url:
            raise SystemExit("corevital: error: --remote_sink http needs --remote_url URL")
        out += ["sink=http", f"sink.url={quote_value(a.remote_url)}"]
    json_out = None
    if a.out is not None:
        path = Path(a.out)
        if path.suffix == ".json":  # the trace goes there; the job's other files next to it
            json_out = path
            path = json_job_dir(path)
        out.append(f"hydra.run.dir={quote_value(str(path))}")
    return out + a.overrides, json_out


def cmd_run(a: argparse.Namespace) -> int:
    from corevital.runner import app as run

    overrides, json_out = run_overrides(a)
    sys.argv = ["corevital", *overrides]
    try:
        run.cli()
    except SystemExit as e:
        if e.code not in (0, None):
            return e.code if isinstance(e.code, int) else 1
    if json_out is not None:
        from corevital.output.writer import read_trace, trace_files

        traces = trace_files(json_job_dir(json_out) / "traces")
        if not traces:
            print("corevital: error: no trace was written (traces.format=none?)", file=sys.stderr)
            return 1
        if traces[0].suffix == ".json":
            shutil.copyfile(traces[0], json_out)
        else:
            json_out.write_text(json.dumps(read_trace(traces[0])), encoding="utf-8")
        print(f"corevital: trace: {json_out}")
    return 0


def trace_schema() -> dict:
    from corevital.output.trace import Trace

    return Trace.model_json_schema()


def cmd_schema(a: argparse.Namespace) -> int:
    print(json.dumps(trace_schema(), indent=2))
    return 0


def validate_file(path: Path, validator) -> str | None:
    """None if `path` (.json or .json.gz) is a valid trace, else one line: where and what the first error is."""
    from corevital.output.writer import read_trace

    try:
        doc = read_trace(path)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path}: not a readable JSON file ({e})"
    from jsonschema.exceptions import best_match

    e = best_match(validator.iter_errors(doc))  # the most specific error (into anyOf branches)
    if e is None:
        return None
    where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
    return f"{path}: invalid at {where}: {e.message}"


def cmd_validate(a: argparse.Namespace) -> int:
    from jsonschema import Draft202012Validator

    from corevital.output.writer import trace_files

    validator = Draft202012Validator(trace_schema())
    files = [
        f
        for name in a.files
        for f in (trace_files(Path(name), recursive=True) if Path(name).is_dir() else [Path(name)])
    ]
    if not files:
        print(
            f"corevital: error: no trace files (prompt_*.json, prompt_*.json.gz) in {' '.join(a.files)}",
            file=sys.stderr,
        )
        return 1
    bad = 0
    for path in files:
        problem = validate_file(path, validator)
        print(problem or f"{path}: ok", file=sys.stderr if problem else sys.stdout)
        bad += problem is not None
    return 1 if bad else 0


def cmd_view(a: argparse.Namespace) -> int:
    """Serve the viewer until interrupted, or write its bundle (--bundle)."""
    paths = [Path(p) for p in a.paths]
    if not _all_dirs(paths):
        return 2
    try:
        if a.bundle:
            return _bundle(paths, Path(a.bundle), a.max_traces, a.search)
        from corevital.view import server

        srv = server.start(paths, a.host, a.port)
    except (FileNotFoundError, OSError) as e:
        print(f"corevital: error: {e}", file=sys.stderr)
        return 2
    print(f"corevital: viewing {srv.sweep.count} trace(s) at {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        srv.sweep.close()
    return 0


def _all_dirs(paths: list[Path]) -> bool:
    """True if every path is a directory; else one sentence on stderr naming the first that is not."""
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        print(f"corevital: error: {missing[0]} is not a directory (give job or sweep dirs)", file=sys.stderr)
    return not missing


def _bundle(paths: list[Path], out: Path, max_traces: int | None, search: str = "") -> int:
    from corevital.view.bundle import write_bundle

    n = write_bundle(paths, out, max_traces, search)
    print(f"corevital: wrote {n} trace(s) to {out / 'index.html'} (opens from file://, no server needed)")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """The viewer's bundle of the first traces (what report.html was)."""
    path = Path(a.path)
    if not _all_dirs([path]):
        return 2
    try:
        return _bundle([path], Path(a.out) if a.out else path / "report", a.max_traces)
    except FileNotFoundError as e:
        print(f"corevital: error: {e}", file=sys.stderr)
        return 2


def cmd_evaluate(a: argparse.Namespace) -> int:
    from corevital.analysis import evaluation as evaluate

    return evaluate.main([a.path, "--resamples", str(a.resamples)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corevital", description="See inside a language model while it generates.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate under capture (the Hydra app with the seed project's flags)")
    r.add_argument("--model", help="gpt2, smollm2 (a config in conf/model/), a hub id or a local path")
    r.add_argument("--prompt", help="the prompt's text (default: the default prompt)")
    r.add_argument("--max_new_tokens", type=int)
    r.add_argument("--device", choices=["auto", "cpu", "cuda"])
    r.add_argument("--seed", type=int)
    r.add_argument("--temperature", type=float)
    r.add_argument("--top_k", type=int)
    r.add_argument("--top_p", type=float)
    r.add_argument("--out", help="the job dir, or a .json file for the trace (the job dir is then FILE.corevital/)")
    r.add_argument("--remote_sink", choices=["local", "http"], help="http: also POST the trace to --remote_url")
    r.add_argument("--remote_url")
    r.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. batch_size=4")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="check trace files (.json, .json.gz, or dirs of them) against the JSON Schema")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)
    sub.add_parser("schema", help="print the trace JSON Schema").set_defaults(func=cmd_schema)
    vw = sub.add_parser("view", help="the interactive viewer of every trace under job or sweep dirs")
    vw.add_argument("paths", nargs="+", metavar="PATH", help="job dirs or sweep dirs")
    vw.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: the URL carries a token)")
    vw.add_argument("--port", type=int, default=8765, help="port (0: a free one)")
    vw.add_argument("--bundle", metavar="OUT", help="write a static copy to OUT/ (opens from file://) instead")
    vw.add_argument("--max-traces", type=int, default=None, help="with --bundle: at most this many traces")
    vw.add_argument("--search", default="", help="with --bundle: only traces whose prompt or output contains this")
    vw.set_defaults(func=cmd_view)
    rep = sub.add_parser("report", help="the viewer's static bundle of a job or sweep dir's first traces")
    rep.add_argument("path")
    rep.add_argument("--max-traces", type=int, default=12)
    rep.add_argument("--out", help="where the bundle goes (default: PATH/report/)")
    rep.set_defaults(func=cmd_report)
    ev = sub.add_parser("evaluate", help="grade every trace under DIR; AUROC and PRR of each signal for a wrong answer")
    ev.add_argument("path")
    ev.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples for the AUROC interval (default 1000)"
    )
    ev.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a, extra = p.parse_known_args(argv)
    if extra and a.command != "run":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.command == "run":
        a.overrides += extra  # -m and other Hydra flags pass through to the app
    return a.func(a)


if __name__ == "__main__":
    raise SystemExit(main())
