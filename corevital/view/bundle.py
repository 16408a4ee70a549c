"""`corevital view --bundle OUT`: the viewer as a folder that opens from file://, no server.

    OUT/index.html              the app's page, with one more script: data/sweep.js
    OUT/static/app.js, app.css  the app, as the server serves it
    OUT/data/sweep.js           the list of the bundled traces, the filters' choices, the evaluation
    OUT/data/t00000.js ...      one per trace: what /api/trace/<id> returns, loaded when opened

Browsers do not let a page from file:// fetch files, but they do run the scripts it names, so
the data travel as scripts that assign JSON (a subset of JavaScript) to `corevitalBundle`. The
folder reads nothing outside itself, so it still works when copied elsewhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson

from corevital.view.data import Sweep
from corevital.view.server import static_bytes

DATA_HOOK = b"<!--bundle-data-->"


def _js(target: str, value) -> bytes:
    """`target = <value as JSON>;` for a data script."""
    return target.encode() + b" = " + orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY) + b";\n"


def write_bundle(paths: list[Path], out: Path, max_traces: int | None = None, search: str = "") -> int:
    """Write the bundle of the traces under `paths` (the first `max_traces` in prompt order whose
    prompt or output contains `search`) to `out`; returns the number of traces bundled."""
    sweep = Sweep(paths)
    try:
        rows, offset = [], 0
        while max_traces is None or len(rows) < max_traces:
            page = sweep.list({"q": search, "offset": str(offset), "limit": "1000"})["rows"]
            if not page:
                break
            rows += page
            offset += len(page)
        rows = rows[:max_traces] if max_traces is not None else rows
        data = out / "data"
        if data.is_dir():
            shutil.rmtree(data)  # an earlier bundle's traces
        (out / "static").mkdir(parents=True, exist_ok=True)
        data.mkdir()
        files, ids = {}, {r["trace_id"] for r in rows}
        siblings = {}
        for i, r in enumerate(rows):
            name = f"t{i:05d}"
            payload = sweep.trace(r["trace_id"])
            head = payload["trace"]
            r["prompt_full"], r["output_full"] = head["prompt_text"], head["output_text"]
            (data / f"{name}.js").write_bytes(
                _js(f"corevitalBundle.loaded[{orjson.dumps(r['trace_id']).decode()}]", payload)
            )
            files[r["trace_id"]] = name
            siblings[r["trace_id"]] = [s for s in sweep.siblings(r["trace_id"]) if s["trace_id"] in ids]
        meta = sweep.meta()
        meta.update(
            count=len(rows),
            models=sorted({r["model"] for r in rows}),
            seeds=sorted({r["seed"] for r in rows}),
            evaluation=bool(meta["evaluation"]),
        )
        bundle = {
            "meta": meta,
            "traces": rows,
            "files": files,
            "siblings": siblings,
            "evaluation": sweep.evaluation() if meta["evaluation"] else None,
            "loaded": {},
        }
        (data / "sweep.js").write_bytes(_js("window.corevitalBundle", bundle))
        page = static_bytes("index.html").replace(DATA_HOOK, b'<script src="data/sweep.js"></script>')
        (out / "index.html").write_bytes(page)
        for name in ("app.js", "app.css"):
            (out / "static" / name).write_bytes(static_bytes(name))
        return len(rows)
    finally:
        sweep.close()
