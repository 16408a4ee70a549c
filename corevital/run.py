"""The Hydra app: `python -m corevital.run [overrides]`, `-m` to sweep.

One job = one composed config: load the prompts and the model, generate each batch of
prompts under capture, write each prompt's JSON trace to `<job dir>/traces/`, all rows to
`<job dir>/summaries.parquet` and one row per trace to `<job dir>/traces.parquet`.
A job whose `done.json` matches its config is skipped (`resume=false` reruns it); a job
that fails records why in `status.json`, and in a sweep the other jobs go on (`jobs.py`,
`manifest.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import traceback
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from corevital import SCHEMA_VERSION, jobs, model_loader, summaries
from corevital import config as schema
from corevital.capture import generate_with_capture
from corevital.config import ConfigError
from corevital.files import atomic_write_text
from corevital.model_loader import LoadedModel, ModelUnavailableError
from corevital.prompts import Prompt, PromptError, expand_prompt_globs, load_prompts
from corevital.sinks import Delivery, DeliveryError, HTTPSink, LocalFileSink, Sink
from corevital.table import TRACES_SCHEMA, trace_row, trace_table, write_parquet
from corevital.trace import GenerationInfo, ModelInfo, RunConfigInfo, TraceWarning, build_trace

log = logging.getLogger("corevital")
USER_ERRORS = (ConfigError, PromptError, ModelUnavailableError)
RESOLVED_CONFIG = "resolved_config.yaml"
PARQUET = "summaries.parquet"
TRACES_PARQUET = "traces.parquet"
TRACES_DIR = "traces"
OUTPUTS = (TRACES_DIR, PARQUET, TRACES_PARQUET, RESOLVED_CONFIG)  # what a job writes besides .hydra/ and its records

schema.register()
jobs.register_resolver()


@dataclass
class JobResult:
    job_dir: Path
    trace_paths: list[str]
    parquet_path: Path
    rows: int
    warnings: list[str]  # "prompt <index>: <message>", from every trace's warnings
    undelivered: int  # traces some sink besides the job dir did not get
    delivery_error: str | None  # why, for the first sink that gave up

    @property
    def outputs(self) -> list[str]:
        """Every output file, relative to the job dir."""
        files = [RESOLVED_CONFIG, *(str(Path(p).relative_to(self.job_dir)) for p in self.trace_paths), PARQUET, TRACES_PARQUET]
        return files


def run_job(cfg: DictConfig, job_dir: Path, model_choice: str) -> JobResult:
    """Run one composed config into `job_dir`; `model_choice` is the `model=` option picked."""
    schema.check_complete(cfg)
    prompts = load_prompts(cfg.prompts, cfg.prompt, schema.DEFAULT_PROMPT)
    resolved = schema.resolved_dict(cfg)
    local, delivery = LocalFileSink(job_dir / TRACES_DIR), Delivery(_extra_sinks(cfg))
    atomic_write_text(job_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(resolved))
    _library_bars(_bars_on(cfg))
    loaded = model_loader.load(cfg.model, cfg.device.type)
    _check_context(prompts, loaded, cfg.sampling.max_new_tokens)
    model_info = _model_info(loaded, model_choice)
    paths, tables, rows, warnings = [], [], [], []
    with _progress(cfg, len(prompts), desc="prompts", unit="prompt") as bar, _logs_above(bar):
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start:start + cfg.batch_size]
            for prompt, cap in zip(batch, _generate(cfg, loaded, batch)):
                trace = build_trace(cap, prompt, loaded.tokenizer.decode, _token_texts(loaded.tokenizer), model_info,
                                    _run_config_info(cfg, prompt, job_dir))
                path = _keep_and_deliver(trace, local, delivery)
                warnings += [f"prompt {prompt.index}: {w.message}" for w in trace.warnings]
                paths.append(path)
                tables.append(trace_table(trace, cap))
                rows.append(trace_row(trace, cap))
                log.info("trace %d/%d: %d prompt + %d generated tokens, %d ms -> %s", prompt.index + 1, len(prompts),
                         cap.prompt_len, cap.generated_len, cap.elapsed_ms, path)
                for w in trace.warnings:
                    log.warning("prompt %d: %s", prompt.index, w.message)
            bar.update(len(batch))
    parquet = job_dir / PARQUET
    n = write_parquet(tables, parquet, resolved)
    write_parquet(rows, job_dir / TRACES_PARQUET, resolved, TRACES_SCHEMA)
    return JobResult(job_dir, paths, parquet, n, warnings, delivery.failures, next(iter(delivery.gave_up.values()), None))


STEP_BAR_MIN_TOKENS = 64  # shorter generations get only the per-prompt bar


def _bars_on(cfg: DictConfig) -> bool:
    return bool(cfg.progress) and sys.stderr.isatty()


def _library_bars(on: bool) -> None:
    """transformers' own bars (e.g. "Loading weights") follow the same rule as ours."""
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


def _progress(cfg: DictConfig, total: int, disable: bool = False, **kwargs):
    """A progress bar on stderr, silent when stderr is not a terminal or with progress=false."""
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=disable or not _bars_on(cfg), dynamic_ncols=True, **kwargs)


def _logs_above(bar):
    """While a bar is shown, log lines go above it instead of through it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return contextlib.nullcontext() if bar.disable else logging_redirect_tqdm(loggers=[logging.getLogger()])


def _generate(cfg: DictConfig, loaded: LoadedModel, batch: list[Prompt]):
    """One `generate` call under capture, with a per-token bar for long generations."""
    n = cfg.sampling.max_new_tokens
    with _progress(cfg, n, desc="tokens", unit="tok", leave=False, disable=n < STEP_BAR_MIN_TOKENS) as steps:
        return generate_with_capture(loaded.model, loaded.tokenizer, [p.text for p in batch], cfg.sampling, cfg.seed,
                                     on_step=None if steps.disable else steps.update)


def _keep_and_deliver(trace, local: LocalFileSink, delivery: Delivery) -> str:
    """Write the trace to the job dir, then to the other sinks; what they did not get is noted
    in the trace's warnings (and the job dir's copy rewritten). Returns the local path."""
    path = local.write(trace)
    problems = delivery.send(trace)
    if problems:
        trace.warnings.extend(TraceWarning(code="delivery_failed", message=m) for m in problems)
        local.write(trace)
    return path


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


def _extra_sinks(cfg: DictConfig) -> list[Sink]:
    """The sinks besides the job dir: `sink=http`, and a `sink._target_` class."""
    s, sinks = cfg.sink, []
    if s.type == "http":
        sinks.append(HTTPSink(s.url, s.timeout_s, s.retries, s.backoff_s, s.token_env))
    if s._target_:
        from hydra.utils import instantiate

        try:
            sink = instantiate({"_target_": s._target_, **OmegaConf.to_container(s.params, resolve=True)})
        except Exception as e:
            raise ConfigError(f"sink._target_={s._target_} could not be instantiated: {e.__cause__ or e}") from None
        if not isinstance(sink, Sink):
            raise ConfigError(f"sink._target_={s._target_} is not a corevital.sinks.Sink subclass")
        sinks.append(sink)
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
        sink={"type": cfg.sink.type, "target": cfg.sink.url if cfg.sink.type == "http" else str(job_dir / TRACES_DIR),
              **({"custom": cfg.sink._target_} if cfg.sink._target_ else {})},
    )


def job_digest(cfg: DictConfig) -> str:
    """What a finished job's marker must match to be skipped: the resolved config, the
    prompt file's bytes (an edited file reruns) and the output schema version."""
    extra = SCHEMA_VERSION
    if cfg.prompts and Path(cfg.prompts).is_file():
        extra += hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()
    return jobs.config_hash(schema.resolved_dict(cfg), extra)


@hydra.main(config_path=schema.config_dir(), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    job_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    sweeping = hc.mode == RunMode.MULTIRUN
    started = time.perf_counter()
    record = jobs.JobRecord(job_dir, overrides, "")
    try:
        schema.check_complete(cfg)
        record.digest = job_digest(cfg)
        if cfg.resume and jobs.is_done(job_dir, record.digest):
            record.skipped()
            log.info("skipped: finished earlier with the same config (resume=false reruns it)")
            print(f"corevital: {job_dir.name}: skipped, already done ({job_dir})")
            return
        record.start(OUTPUTS)
        result = run_job(cfg, job_dir, hc.runtime.choices.get("model") or "custom")
        if result.undelivered and cfg.sink.required:
            raise DeliveryError(f"{result.undelivered} of {len(result.trace_paths)} trace(s) could not be delivered "
                                f"({result.delivery_error}); they are kept in {job_dir / TRACES_DIR}; "
                                f"sink.required=false makes this a warning")
        record.done(result.outputs, traces=len(result.trace_paths), rows=result.rows, warnings=result.warnings)
    except (*USER_ERRORS, DeliveryError) as e:
        record.failed(e)
        _report(e, job_dir.name if sweeping else None, debug=_debug(hc))
        if not sweeping:
            raise SystemExit(2 if isinstance(e, USER_ERRORS) else 1) from None
        return
    except KeyboardInterrupt as e:
        record.failed(e, status="interrupted")
        kept = len(list((job_dir / TRACES_DIR).glob("*.json")))
        print(f"corevital: interrupted; {kept} finished trace(s) kept in {job_dir / TRACES_DIR}, "
              f"no tables written (rerun to complete the job)", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        record.failed(e)
        if not sweeping:
            raise
        log.exception("job failed")  # the traceback goes to the job's log; the sweep goes on
        print(f"corevital: error: {job_dir.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return
    for w in result.warnings:
        print(f"corevital: warning: {w}", file=sys.stderr)
    print(f"corevital: {len(result.trace_paths)} trace(s) in {result.job_dir / TRACES_DIR}, "
          f"{result.rows} rows in {result.parquet_path} ({time.perf_counter() - started:.1f} s)")


def _debug(hc) -> bool:
    """Tracebacks for user errors too: `hydra.verbose=true` or COREVITAL_DEBUG=1."""
    return bool(hc.verbose) or os.environ.get("COREVITAL_DEBUG", "") not in ("", "0", "false")


def _report(error: Exception, job: str | None, debug: bool) -> None:
    log.error("%s", error)
    if debug:
        traceback.print_exc()
    print(f"corevital: error: {job + ': ' if job else ''}{error}", file=sys.stderr)


MULTIRUN_FLAGS = ("-m", "--multirun")


def cli() -> None:
    """Entry point. Lets `-m` stand anywhere, as in `corevital.run model=gpt2 -m seed=1,2,3`:
    Hydra's argument parser only takes it before the overrides."""
    flags = [a for a in sys.argv[1:] if a in MULTIRUN_FLAGS]
    rest = [a for a in sys.argv[1:] if a not in MULTIRUN_FLAGS]
    try:
        rest = expand_prompt_globs(rest, sweeping=bool(flags))
    except PromptError as e:
        print(f"corevital: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *flags, *rest]
    main()


if __name__ == "__main__":
    cli()
