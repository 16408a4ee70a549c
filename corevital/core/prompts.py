"""Prompt loading: a .txt file (one prompt per non-empty line), a .jsonl file, or one inline prompt."""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

from corevital.core.config import quote_value

INLINE_SOURCE = "inline"
GRADERS = ("exact", "contains", "number", "regex")  # how `corevital evaluate` reads an answer (grading.py)
DEFAULT_GRADER = "contains"


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Prompt:
    index: int  # 0-based position among the file's prompts
    text: str
    id: str | None  # the .jsonl "id", if any
    source: str  # the prompt file's path, or "inline"
    answer: tuple[str, ...] | None = None  # the .jsonl "answer": its accepted strings (a number as its JSON text)
    grader: str | None = None  # the .jsonl "grader" (default "contains") when there is an answer


def load_prompts(prompts_path: str | None, prompt: str | None, default: str) -> list[Prompt]:
    """The prompts a job runs: from `prompts=FILE`, else `prompt=TEXT`, else the default prompt."""
    if prompts_path is None:
        text = default if prompt is None else prompt
        if not text.strip():
            raise PromptError('the prompt is empty; give some text with prompt="..."')
        return [Prompt(0, text, None, INLINE_SOURCE)]
    path = Path(prompts_path)
    if not path.is_file():
        raise PromptError(f"prompt file {prompts_path!r} does not exist; check prompts=PATH")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"prompt file {prompts_path!r} is not UTF-8 (byte {e.start}); re-encode it as UTF-8"
        ) from None
    if path.suffix == ".jsonl":
        items = _parse_jsonl(content, prompts_path)
    elif path.suffix == ".txt":
        items = [(line, None, None, None) for line in content.splitlines() if line.strip()]
    else:
        raise PromptError(f"prompt file {prompts_path!r} must end in .txt or .jsonl")
    if not items:
        raise PromptError(f"prompt file {prompts_path!r} holds no prompts; add one prompt per line")
    return [Prompt(i, text, pid, prompts_path, answer, grader) for i, (text, pid, answer, grader) in enumerate(items)]


def _parse_jsonl(content: str, name: str) -> list[tuple[str, str | None, tuple[str, ...] | None, str | None]]:
    items = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{name}:{lineno}: not valid JSON ({e.msg}); each line must be a JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptError(f'{name}:{lineno}: needs a string field "prompt", e.g. {{"prompt": "...", "id": "q1"}}')
        if not obj["prompt"].strip():
            raise PromptError(f"{name}:{lineno}: the prompt is empty")
        pid = obj.get("id")
        items.append((obj["prompt"], None if pid is None else str(pid), *parse_answer(obj, f"{name}:{lineno}")))
    return items


def parse_answer(obj: dict, where: str) -> tuple[tuple[str, ...] | None, str | None]:
    """A .jsonl line's ("answer", "grader") as (accepted strings, grader name), (None, None)
    without an answer. An answer is a string, a number (kept as its JSON text, e.g. "42",
    "-3.5") or a non-empty list of strings, none of them empty or only whitespace; a regex
    answer must compile."""
    answer, grader = obj.get("answer"), obj.get("grader")
    if answer is None:
        if grader is not None:
            raise PromptError(f'{where}: "grader" is set but there is no "answer" to grade against')
        return None, None
    grader = DEFAULT_GRADER if grader is None else grader
    if grader not in GRADERS:
        raise PromptError(f"{where}: unknown grader {grader!r}; use one of {', '.join(GRADERS)}")
    if (
        isinstance(answer, bool)
        or not isinstance(answer, (str, int, float, list))
        or isinstance(answer, list)
        and (not answer or not all(isinstance(x, str) for x in answer))
    ):
        raise PromptError(f'{where}: "answer" must be a string, a number or a non-empty list of strings')
    answers = (
        tuple(answer) if isinstance(answer, list) else (answer if isinstance(answer, str) else json.dumps(answer),)
    )
    if any(not text.strip() for text in answers):
        raise PromptError(f'{where}: "answer" is empty; an empty answer would grade every output correct')
    for text in answers:
        if grader == "regex":
            try:
                re.compile(text)
            except re.error as e:
                raise PromptError(f"{where}: the regex answer {text!r} does not compile ({e})") from None
        if grader == "number" and not NUMBER_ANSWER.fullmatch(text.replace(",", "")):
            raise PromptError(f"{where}: the number grader needs a numeric answer (got {text!r})")
    return answers, grader


NUMBER_ANSWER = re.compile(r"-?\d+(\.\d+)?")


_GLOB = re.compile(r"[*?\[]")
_PLAIN = re.compile(r"^[\w./+@%~-]+$")  # needs no quoting in a Hydra override


def _quote(path: str) -> str:
    return path if _PLAIN.match(path) else quote_value(path)


def expand_prompt_globs(args: list[str], sweeping: bool) -> list[str]:
    """Command-line overrides with `prompts=` glob patterns replaced by the files they match,
    sorted, as a sweep list (`prompts='data/*.txt'` -> `prompts=data/a.txt,data/b.txt`), so
    that a multirun runs one job per file. Without -m a pattern must match exactly one file.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key != "prompts" or not sep or not _GLOB.search(value):
            out.append(arg)
            continue
        pattern = value.strip("'\"")
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise PromptError(
                f"prompts={pattern} matches no file; check the pattern (quote it so the shell leaves it alone)"
            )
        if len(matches) > 1 and not sweeping:
            raise PromptError(f"prompts={pattern} matches {len(matches)} files; add -m to run one job per file")
        out.append("prompts=" + ",".join(_quote(m) for m in matches))
    return out
