"""Shared fixtures: tiny random GPT-2 and Llama checkpoints saved locally, and Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Attention weights say which earlier positions a query position reads from.",
    "Hidden states grow and shrink as the residual stream passes through the blocks.",
    "Researchers sweep prompts, models and seeds, then analyse the results in pandas.",
]
PROMPTS = ["The quick brown fox", "A language model predicts the next token from", "Attention"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def save_tiny(tmp_path_factory, name: str, config_cls, model_cls, **config) -> str:
    """Build a random-weight model (seed 0, init 0.2 so distributions are not flat) with the
    test tokenizer, save both, and return the directory."""
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=len(tok),
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **config,
    )
    model = model_cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 3-block GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return save_tiny(
        tmp_path_factory, "tiny-gpt2", GPT2Config, GPT2LMHeadModel, n_embd=32, n_layer=3, n_head=4, n_positions=512
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 3-block Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny(
        tmp_path_factory,
        "tiny-llama",
        LlamaConfig,
        LlamaForCausalLM,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def tiny_model(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.fixture
def prompt_file(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n", encoding="utf-8")
    return str(path)


def compose(overrides: list[str]):
    """Compose the app's config exactly as `python -m corevital.run` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from corevital.core import config

    config.register()
    with initialize_config_dir(config.config_dir(), version_base=None):
        return hydra_compose("config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m corevital.run ARGS` in a fresh process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "corevital.run", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(params=["fused", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the fused CPU kernels (which this project's machines can compile) and
    again with the torch ops that replace them where no C compiler works."""
    from corevital.kernels import fused

    if request.param == "torch":
        monkeypatch.setattr(fused, "available", lambda: False)
    elif os.environ.get("COREVITAL_FUSED") == "0":
        pytest.skip("COREVITAL_FUSED=0")
    else:
        assert fused.available(), "the fused CPU kernels did not compile (see the log's warning)"
    return request.param
