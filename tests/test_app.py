"""The Hydra app as users run it: `python -m corevital.run`, single runs and multiruns."""

import json
from pathlib import Path

import pandas as pd
import pytest

from corevital.core.prompts import PromptError
from corevital.output.trace import Trace
from corevital.runner.app import run_job
from corevital.runner.jobs import job_name

from conftest import compose, run_cli


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/summaries.parquet"))


def test_multirun_over_seeds_writes_complete_job_dirs(tiny_gpt2, prompt_file, tmp_path):
    sweep = tmp_path / "sweep"
    common = [f"model.name_or_path={tiny_gpt2}", f"prompts={prompt_file}", "sampling.max_new_tokens=8"]
    proc = run_cli([*common, f"hydra.sweep.dir={sweep}", "-m", "seed=1,2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = [sweep / job_name([*common, f"seed={s}"]) for s in (1, 2)]
    assert _job_dirs(sweep) == sorted(jobs)
    frames = []
    for job in jobs:
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "resolved_config.yaml").is_file()
        traces = sorted((job / "traces").glob("*.json"))
        assert [t.name for t in traces] == ["prompt_00000.json", "prompt_00001.json", "prompt_00002.json"]
        df = pd.read_parquet(job / "summaries.parquet")
        assert len(df) == sum(Trace.model_validate_json(t.read_text()).summary.total_steps * 3 for t in traces)
        frames.append(df)
    sweep_df = pd.concat(frames)
    assert sorted(sweep_df.groupby("seed").trace_id.nunique().items()) == [(1, 3), (2, 3)]
    tokens = [df[df.layer_index == 0].token_id.tolist() for df in frames]
    assert tokens[0] != tokens[1], "another seed, another sample"
    assert proc.stdout.count("3 trace(s)") == 2


def test_no_prompt_uses_default_prompt_and_prints_where_outputs_went(tiny_llama, tmp_path):
    proc = run_cli([f"model.name_or_path={tiny_llama}", "sampling.max_new_tokens=3", "hydra.run.dir=out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'out' / 'summaries.parquet'}" in proc.stdout
    trace = json.loads((tmp_path / "out" / "traces" / "prompt_00000.json").read_text())
    assert trace["prompt"]["source"] == "inline" and trace["prompt"]["text"].startswith("Explain")


def test_prompt_longer_than_context_window_fails_before_generating(tiny_gpt2, tmp_path):
    """The tiny GPT-2 has 512 positions: say both lengths instead of crashing inside the model."""
    prompts = tmp_path / "long.txt"
    prompts.write_text("short prompt\n" + "the quick brown fox " * 200 + "\n")
    cfg = compose([f"model.name_or_path={tiny_gpt2}", f"prompts={prompts}", "sampling.max_new_tokens=4"])
    with pytest.raises(
        PromptError,
        match=r"prompt 1 .* has \d+ tokens; with sampling.max_new_tokens=4 that is \d+, "
        r"more than the model's context window of 512 positions",
    ):
        run_job(cfg, tmp_path / "job", "tiny")
    assert not (tmp_path / "job" / "summaries.parquet").exists()


def test_unreachable_hub_fails_fast_with_one_sentence(tmp_path):
    """Not offline by env, but the hub is unreachable: no minute of retries, one clear sentence."""
    env = {
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
    }
    proc = run_cli(["model=gpt2", "hydra.run.dir=out"], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model 'gpt2' is not available" in proc.stderr and "hub cannot be reached" in proc.stderr


def test_load_sweep_reads_every_job(tiny_llama, prompt_file, tmp_path):
    from corevital.analysis import load_sweep

    for seed in (1, 2):
        cfg = compose(
            [f"model.name_or_path={tiny_llama}", f"prompts={prompt_file}", "sampling.max_new_tokens=3", f"seed={seed}"]
        )
        run_job(cfg, tmp_path / "sweep" / f"seed={seed}", "tiny")
    df = load_sweep(tmp_path / "sweep", columns=["seed", "trace_id", "logits_entropy"])
    per_job = [pd.read_parquet(p) for p in sorted((tmp_path / "sweep").glob("*/summaries.parquet"))]
    assert list(df.columns) == ["seed", "trace_id", "logits_entropy"]
    assert len(df) == sum(len(j) for j in per_job) and sorted(df.seed.unique()) == [1, 2]
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "empty")
