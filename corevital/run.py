"""The Hydra app: `python -m corevital.run [overrides]`, `-m` to sweep.

One job = one composed config: load the prompts and the model, generate each batch of
prompts under capture, write each prompt's JSON trace to `<job dir>/traces/`, and all rows
to `<job dir>/summaries.parquet`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from corevital import config as schema
from corevital import model_loader, summaries
from corevital.capture import generate_with_capture
from corevital.config import ConfigError
from corevital.files import atomic_write_text
from corevital.model_loader import LoadedModel, ModelUnavailableError
from corevital.prompts import Prompt, PromptError, load_prompts
from corevital.sinks import HTTPSink, LocalFileSink, Sink
from corevital.table import trace_table, write_parquet
from corevital.trace import GenerationInfo, ModelInfo, RunConfigInfo, build_trace

log = logging.getLogger("corevital")
USER_ERRORS = (ConfigError, PromptError, ModelUnavailableError)
RESOLVED_CONFIG = "resolved_config.yaml"
PARQUET = "summaries.parquet"

schema.register()


@dataclass
class JobResult:
    job_dir: Path
    trace_paths: list[str]
    parquet_path: Path
    rows: int


def run_job(cfg: DictConfig, job_dir: Path, model_choice: str) -> JobResult:
    """Run one composed config into `job_dir`; `model_choice` is the `model=` option picked."""
    schema.check_complete(cfg)
    prompts = load_prompts(cfg.prompts, cfg.prompt, schema.DEFAULT_PROMPT)
    resolved = schema.resolved_dict(cfg)
    atomic_write_text(job_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(resolved))
    loaded = model_loader.load(cfg.model, cfg.device.type)
    _check_context(prompts, loaded, cfg.sampling.max_new_tokens)
    model_info = _model_info(loaded, model_choice)
    sinks = _sinks(cfg, job_dir)
    paths, tables = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        captures = generate_with_capture(loaded.model, loaded.tokenizer, [p.text for p in batch], cfg.sampling, cfg.seed)
        for prompt, cap in zip(batch, captures):
            trace = build_trace(cap, prompt, loaded.tokenizer.decode, _token_texts(loaded.tokenizer), model_info,
                                _run_config_info(cfg, prompt, job_dir))
            written = [sink.write(trace) for sink in sinks]
            paths.append(written[0])
            tables.append(trace_table(trace, cap))
            log.info("trace %d/%d: %d prompt + %d generated tokens, %d ms -> %s", prompt.index + 1, len(prompts),
                     cap.prompt_len, cap.generated_len, cap.elapsed_ms, written[0])
    parquet = job_dir / PARQUET
    rows = write_parquet(tables, parquet, resolved)
    return JobResult(job_dir, paths, parquet, rows)


def _check_context(prompts: list[Prompt], loaded: LoadedModel, max_new_tokens: int) -> None:
    """Fail before generating if a prompt plus its new tokens cannot fit the model's positions."""
    window = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if not window:
        return
    lengths = [len(ids) for ids in loaded.tokenizer([p.text for p in prompts])["input_ids"]]
    for prompt, n in zip(prompts, lengths):
        if n + max_new_tokens > window:
            raise PromptError(
                f"prompt {prompt.index} ({prompt.source}) has {n} tokens; with sampling.max_new_tokens={max_new_tokens} "
                f"that is {n + max_new_tokens}, more than the model's context window of {window} positions; "
                f"shorten the prompt or lower sampling.max_new_tokens")


def _token_texts(tokenizer):
    return lambda ids: tokenizer.batch_decode([[int(i)] for i in ids])


def _sinks(cfg: DictConfig, job_dir: Path) -> list[Sink]:
    sinks: list[Sink] = [LocalFileSink(job_dir / "traces")]
    if cfg.sink.type == "http":
        sinks.append(HTTPSink(cfg.sink.url, cfg.sink.timeout_s))
    return sinks


def _model_info(loaded: LoadedModel, choice: str) -> ModelInfo:
    c = loaded.model.config.get_text_config()
    return ModelInfo(name=choice, hf_id=loaded.model_id, revision=loaded.revision, architecture=type(loaded.model).__name__,
                     num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                     tokenizer_hf_id=loaded.model_id, dtype=loaded.dtype, device=str(loaded.device))


def _run_config_info(cfg: DictConfig, prompt: Prompt, job_dir: Path) -> RunConfigInfo:
    s = cfg.sampling
    return RunConfigInfo(
        seed=cfg.seed, device_requested=cfg.device.type, max_new_tokens=s.max_new_tokens, batch_size=cfg.batch_size,
        generation=GenerationInfo(do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
        prompt_source=prompt.source, prompt_index=prompt.index,
        sketch={"method": "gaussian_unit_directions", "dim": summaries.SKETCH_DIM, "seed": summaries.SKETCH_SEED},
        sink={"type": cfg.sink.type, "target": cfg.sink.url if cfg.sink.type == "http" else str(job_dir / "traces")},
    )


@hydra.main(config_path=schema.config_dir(), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    started = time.perf_counter()
    try:
        result = run_job(cfg, Path(hc.runtime.output_dir), hc.runtime.choices.get("model") or "custom")
    except USER_ERRORS as e:
        log.error("%s", e)
        print(f"corevital: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"corevital: {len(result.trace_paths)} trace(s) in {result.job_dir / 'traces'}, "
          f"{result.rows} rows in {result.parquet_path} ({time.perf_counter() - started:.1f} s)")


MULTIRUN_FLAGS = ("-m", "--multirun")


def cli() -> None:
    """Entry point. Lets `-m` stand anywhere, as in `corevital.run model=gpt2 -m seed=1,2,3`:
    Hydra's argument parser only takes it before the overrides."""
    flags = [a for a in sys.argv[1:] if a in MULTIRUN_FLAGS]
    sys.argv = [sys.argv[0], *flags, *(a for a in sys.argv[1:] if a not in MULTIRUN_FLAGS)]
    main()


if __name__ == "__main__":
    cli()
