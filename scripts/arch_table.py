"""docs/models.md's architecture lists, from the architecture matrix itself.

Builds every entry of the installed transformers' causal-LM mapping as tests/archs.py does
(the same tiny random model test_archs.py checks) and asks corevital.capture.support for its verdict:
exact, refused (with the reason), or not built (archs.SKIPPED). Prints the Markdown; with
--write, replaces the block between docs/models.md's `<!-- archs -->` markers.

    .venv/bin/python scripts/arch_table.py --write     # about a minute
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402

from corevital.capture import support  # noqa: E402

import archs  # noqa: E402
from conftest import _tokenizer  # noqa: E402

MARKERS = ("<!-- archs -->", "<!-- /archs -->")


def verdicts() -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(exact names, refused names by reason, not-built names by reason)."""
    transformers.logging.set_verbosity_error()
    tok = _tokenizer()
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    exact, refused, skipped = [], defaultdict(list), defaultdict(list)
    for name in archs.architectures():
        if name in archs.SKIPPED:
            skipped[archs.SKIPPED[name]].append(name)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = archs.build(name, len(tok), special)
            reason = support.verdict_of(model)
        if reason:
            # a forward-pass error's own text differs per model: group by the sentence before it
            reason = re.sub(r" \(\w+(Error|Exception): [^()]*(\([^()]*\)[^()]*)*\)", "", reason)
            # the cross-check names the first value that differs: group by what it compared
            reason = re.sub(
                r"^its \w+ at row [^(]* in an independent", "a recorded value differs from an independent", reason
            )
            refused[re.sub(r"^its \d+ transformer blocks", "its transformer blocks", reason)].append(name)
        else:
            exact.append(name)
    return exact, refused, skipped


def markdown() -> str:
    exact, refused, skipped = verdicts()
    names = lambda xs: ", ".join(f"`{x}`" for x in sorted(xs))  # noqa: E731
    mapped = len(archs.architectures()) - len(archs.VARIANTS)
    lines = [
        f"transformers {transformers.__version__}: {mapped} causal-LM mapping entries, plus "
        f"{len(archs.VARIANTS)} setting variant(s) ({names(archs.VARIANTS)}).",
        "",
        f"Exact ({len(exact)}): {names(exact)}.",
        "",
        f"Refused ({sum(map(len, refused.values()))}), by reason:",
    ]
    lines += [f"- {why}: {names(xs)}" for why, xs in sorted(refused.items(), key=lambda kv: -len(kv[1]))]
    lines += ["", f"Not built ({sum(map(len, skipped.values()))}), by reason:"]
    lines += [f"- {why}: {names(xs)}" for why, xs in sorted(skipped.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace docs/models.md's block instead of printing it")
    text = markdown()
    if not ap.parse_args().write:
        print(text)
        return
    readme = ROOT / "docs" / "models.md"
    old = readme.read_text()
    start, end = old.index(MARKERS[0]) + len(MARKERS[0]), old.index(MARKERS[1])
    readme.write_text(old[:start] + "\n" + text + "\n" + old[end:])


if __name__ == "__main__":
    main()
