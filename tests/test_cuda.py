"""CUDA tier (skipped without a GPU): capture on the GPU gives the CPU reference's values."""

import pandas as pd
import pytest
import torch

from corevital.runner.app import run_job

from conftest import compose
from reference import assert_matches_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cuda_capture_matches_cpu_reference(tiny_model, prompt_file, tmp_path, batch_size):
    cfg = compose(
        [
            f"model.name_or_path={tiny_model}",
            f"prompts={prompt_file}",
            "device=cuda",
            "model.dtype=float32",
            "sampling.max_new_tokens=6",
            f"batch_size={batch_size}",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    df = pd.read_parquet(result.parquet_path)
    assert df.trace_id.nunique() == 3
    for _, rows in df.groupby("trace_id"):
        assert assert_matches_reference(rows, tiny_model) > 0
