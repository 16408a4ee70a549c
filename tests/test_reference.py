"""Integration tier: every Parquet value equals an independent teacher-forced recomputation."""

import pandas as pd
import pytest

from corevital.runner.app import run_job

from conftest import compose
from reference import assert_matches_reference


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampling=greedy", "batch_size=1"],
        ["sampling=default", "batch_size=1", "seed=3"],  # raw logits: sampling settings must not leak in
        ["sampling=greedy", "batch_size=2"],  # left padding must be neither a row nor an attention key
        ["sampling=default", "batch_size=3", "sampling.top_k=5", "sampling.temperature=1.5"],
    ],
    ids=["greedy", "sampled", "batched-greedy", "batched-sampled"],
)
def test_parquet_matches_independent_recomputation(tiny_model, prompt_file, tmp_path, overrides):
    cfg = compose(
        [
            f"model.name_or_path={tiny_model}",
            f"prompts={prompt_file}",
            "device=cpu",
            "sampling.max_new_tokens=6",
            *overrides,
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    df = pd.read_parquet(result.parquet_path)
    assert df.trace_id.nunique() == 3
    compared = sum(assert_matches_reference(rows, tiny_model) for _, rows in df.groupby("trace_id"))
    assert compared > 0
