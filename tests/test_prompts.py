"""Prompt files: .txt, .jsonl, inline, and their errors."""

import pytest

from corevital.core.prompts import PromptError, load_prompts


def test_txt_one_prompt_per_non_empty_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\n  \nsecond line\nthird\n", encoding="utf-8")
    prompts = load_prompts(str(f), None, "default")
    assert [(p.index, p.text, p.source) for p in prompts] == [
        (0, "first", str(f)),
        (1, "second line", str(f)),
        (2, "third", str(f)),
    ]


def test_jsonl_with_optional_id(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "id": 7}\n\n{"prompt": "b"}\n', encoding="utf-8")
    prompts = load_prompts(str(f), None, "default")
    assert [(p.index, p.text, p.id) for p in prompts] == [(0, "a", "7"), (1, "b", None)]


def test_inline_and_default():
    assert load_prompts(None, "hello", "default")[0].text == "hello"
    (p,) = load_prompts(None, None, "default")
    assert (p.text, p.source, p.index) == ("default", "inline", 0)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("p.jsonl", '{"prompt": "a"}\nnot json\n', r"p.jsonl:2: not valid JSON"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"text": "b"}\n', r"p.jsonl:3: needs a string field \"prompt\""),
        ("p.txt", "\n \n", "holds no prompts"),
        ("p.csv", "a\n", "must end in .txt or .jsonl"),
    ],
)
def test_bad_prompt_files_name_the_problem(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(PromptError, match=message):
        load_prompts(str(f), None, "default")


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"), None, "d")
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompts(str(f), None, "d")
    with pytest.raises(PromptError, match="empty"):
        load_prompts(None, "   ", "d")
