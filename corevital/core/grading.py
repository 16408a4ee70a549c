"""Graders: is a generated text right, given the prompt file's answer? (docs/evaluate.md)

    exact     equal after lower-casing and collapsing whitespace
    contains  the answer, so normalised, is a substring of the output, so normalised
    number    the first number in the output (optional minus sign, digits, optional decimal
              part; commas between digits ignored) equals the answer as a number
    regex     Python `re.search` of the answer as a pattern finds a match

With several accepted answers, any one counts. Graders read the generated text with a
trailing end-of-sequence marker (`<|im_end|>`, `</s>`, `<eos>`, `<end_of_turn>`, ...) removed:
`output_text` keeps the special tokens the model produced.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Callable, Sequence

from corevital.core.prompts import GRADERS

END_MARKERS = re.compile(r"(?:\s*(?:<\|[^|<>]{1,40}\|>|</s>|<eos>|<end_of_turn>|<\|endoftext\|>))+\s*$")
NUMBER = re.compile(r"-?\d+(?:,\d+)*(?:\.\d+)?")


class GradeError(ValueError):
    """A grader that does not exist, or an answer it cannot use; the message says which."""


def normalise(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def strip_end(text: str) -> str:
    """The text without trailing end-of-sequence markers."""
    return END_MARKERS.sub("", text)


def first_number(text: str) -> str | None:
    """The first number in `text` as written (commas kept), None when there is none."""
    m = NUMBER.search(text)
    return m.group(0) if m else None


def as_number(text: str) -> Decimal:
    """'1,234.50' -> Decimal('1234.50'): commas between digits ignored."""
    return Decimal(text.replace(",", ""))


def _exact(output: str, answers: Sequence[str]) -> tuple[bool, str]:
    out = normalise(output)
    return any(out == normalise(a) for a in answers), out


def _contains(output: str, answers: Sequence[str]) -> tuple[bool, str]:
    out = normalise(output)
    return any(normalise(a) in out for a in answers), out


def _number(output: str, answers: Sequence[str]) -> tuple[bool, str]:
    found = first_number(output)
    if found is None:
        return False, ""
    try:
        targets = [as_number(a) for a in answers]
    except ArithmeticError:
        raise GradeError(f"the number grader needs numeric answers (got {list(answers)})") from None
    return as_number(found) in targets, found


def _regex(output: str, answers: Sequence[str]) -> tuple[bool, str]:
    try:
        return any(re.search(a, output) for a in answers), output
    except re.error as e:
        raise GradeError(f"a regex answer does not compile ({e})") from None


GRADER_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], tuple[bool, str]]] = {
    "exact": _exact,
    "contains": _contains,
    "number": _number,
    "regex": _regex,
}
assert tuple(GRADER_FUNCTIONS) == GRADERS


def grade(output: str, answer: str | float | Sequence[str], grader: str = "contains") -> tuple[bool, str]:
    """(correct, the part of the output the grader read) for one generated text.

    `answer`: a string, a number or a list of accepted strings, as in a .jsonl line. The part
    read is the normalised output (exact, contains), the first number as written (number;
    "" when there is none) or the output itself (regex), end-of-sequence markers removed.
    """
    if grader not in GRADER_FUNCTIONS:
        raise GradeError(f"unknown grader {grader!r}; use one of {', '.join(GRADERS)}")
    answers = (
        [answer] if isinstance(answer, str) else [str(answer)] if isinstance(answer, (int, float)) else list(answer)
    )
    if not answers or any(not str(a).strip() for a in answers):
        raise GradeError(f"the answer {answer!r} is empty; an empty answer would grade every output correct")
    return GRADER_FUNCTIONS[grader](strip_end(output), answers)
