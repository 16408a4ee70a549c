"""Prompt loading: a .txt file (one prompt per non-empty line), a .jsonl file, or one inline prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

INLINE_SOURCE = "inline"


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Prompt:
    index: int  # 0-based position among the file's prompts
    text: str
    id: str | None  # the .jsonl "id", if any
    source: str  # the prompt file's path, or "inline"


def load_prompts(prompts_path: str | None, prompt: str | None, default: str) -> list[Prompt]:
    """The prompts a job runs: from `prompts=FILE`, else `prompt=TEXT`, else the default prompt."""
    if prompts_path is None:
        text = default if prompt is None else prompt
        if not text.strip():
            raise PromptError("the prompt is empty; give some text with prompt=\"...\"")
        return [Prompt(0, text, None, INLINE_SOURCE)]
    path = Path(prompts_path)
    if not path.is_file():
        raise PromptError(f"prompt file {prompts_path!r} does not exist; check prompts=PATH")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {prompts_path!r} is not UTF-8 (byte {e.start}); re-encode it as UTF-8") from None
    if path.suffix == ".jsonl":
        items = _parse_jsonl(content, prompts_path)
    elif path.suffix == ".txt":
        items = [(line, None) for line in content.splitlines() if line.strip()]
    else:
        raise PromptError(f"prompt file {prompts_path!r} must end in .txt or .jsonl")
    if not items:
        raise PromptError(f"prompt file {prompts_path!r} holds no prompts; add one prompt per line")
    return [Prompt(i, text, pid, prompts_path) for i, (text, pid) in enumerate(items)]


def _parse_jsonl(content: str, name: str) -> list[tuple[str, str | None]]:
    items = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{name}:{lineno}: not valid JSON ({e.msg}); each line must be a JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptError(f"{name}:{lineno}: needs a string field \"prompt\", e.g. {{\"prompt\": \"...\", \"id\": \"q1\"}}")
        if not obj["prompt"].strip():
            raise PromptError(f"{name}:{lineno}: the prompt is empty")
        pid = obj.get("id")
        items.append((obj["prompt"], None if pid is None else str(pid)))
    return items
