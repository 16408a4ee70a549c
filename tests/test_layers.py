"""The code's layers (docs/development.md): import-linter's contract in pyproject.toml (each
layer imports only from the layers below it), and no import circle anywhere in the package,
function-level imports included."""

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_layers_run_one_way():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:]


def _circle(graph) -> list[str] | None:
    """One import circle among the package's modules, or None (iterative depth-first search)."""
    modules = sorted(graph.modules)
    state = dict.fromkeys(modules, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in modules:
        if state[start]:
            continue
        path, stack = [start], [iter(sorted(graph.find_modules_directly_imported_by(start)))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif state.get(nxt) == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.find_modules_directly_imported_by(nxt))))
    return None


def test_no_import_circle():
    graph = grimp.build_graph("corevital", include_external_packages=False)
    for package in [
        m for m in graph.modules if graph.find_children(m)
    ]:  # a package's __init__ re-exports: not a circle
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=child, imported=package):
                graph.remove_import(importer=child, imported=package)
    assert _circle(graph) is None, " -> ".join(_circle(graph))


def test_the_checks_catch_an_upward_import(tmp_path):
    """A lower layer importing a higher one breaks the contract (the linter sees the change)."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "corevital", copy / "corevital", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    files = copy / "corevital" / "core" / "files.py"
    files.write_text(files.read_text() + "\nfrom corevital.runner import jobs  # noqa: E402,F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint)], cwd=copy, capture_output=True, text=True, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}
    )
    assert proc.returncode != 0 and "corevital.core.files -> corevital.runner.jobs" in proc.stdout, proc.stdout[-2000:]
