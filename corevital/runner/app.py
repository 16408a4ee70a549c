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
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from corevital import SCHEMA_VERSION
from corevital.capture import ModelFacts, generate_with_capture, prompt_token_ids, query_heads, support
from corevital.core import config as schema
from corevital.core import metrics
from corevital.core.config import ConfigError, CoreVitalConfig, SamplingConfig
from corevital.core.files import atomic_write_text
from corevital.core.lock import JobLocked, job_lock
from corevital.core.prompts import Prompt, PromptError, expand_prompt_globs, load_prompts
from corevital.kernels import summaries
from corevital.model import lens
from corevital.model import loader as model_loader
from corevital.model.loader import LoadedModel, ModelUnavailableError
from corevital.output import table, trackers
from corevital.output.sinks import Delivery, DeliveryError, HTTPSink, Sink
from corevital.output.trace import GenerationInfo, ModelInfo, RunConfigInfo
from corevital.output.tracedoc import TraceHeader
from corevital.output.vocab import Vocabulary
from corevital.output.writer import (
    COST_PER_ROW,
    PARQUET,
    TRACES_DIR,
    TRACES_PARQUET,
    Batch,
    JobWriter,
    OutputError,
    Store,
    trace_files,
)
from corevital.runner import jobs, slurm, threads
from corevital.runner.placement import asks_threads, writer_mode
from corevital.runner.stopping import Stopped, StopRequest

log = logging.getLogger("corevital")
USER_ERRORS = (ConfigError, PromptError, ModelUnavailableError, JobLocked, trackers.TrackerError)
RESOLVED_CONFIG = "resolved_config.yaml"

schema.register()
jobs.register_resolver()
slurm.register_resolver()


@dataclass
class JobResult:
    job_dir: Path
    traces_format: str
    traces: int  # traces written (with traces.format=none: rows of traces.parquet)
    rows: int
    warnings: list[str]  # the first few "prompt <index>: <message>", from every trace's warnings
    warning_count: int
    undelivered: int  # traces some sink besides the job dir did not get
    delivery_error: str | None  # why, for the first sink that gave up
    timings: dict[
        str, float
    ]  # seconds: model load, generate calls, writer busy, wait for the writer at the end; writer mode

    @property
    def parquet_path(self) -> Path:
        return self.job_dir / PARQUET

    @property
    def trace_paths(self) -> list[str]:
        """The trace files, read from the job dir (a job keeps no per-prompt list)."""
        return [str(p) for p in trace_files(self.job_dir / TRACES_DIR)]

    @property
    def outputs(self) -> list[str]:
        """The job's output files, relative to the job dir (traces/ is counted in done.json)."""
        return [RESOLVED_CONFIG, PARQUET, TRACES_PARQUET]


@dataclass(frozen=True)
class Capturing:
    """How every generate call of a job is captured: metrics.logit_lens (None: off), the user
    metrics, and the model's facts (probed once, after the load-time check)."""

    lens: str | None
    extras: tuple
    facts: ModelFacts


def run_job(
    cfg: CoreVitalConfig | DictConfig,
    job_dir: Path,
    model_choice: str,
    digest: str | None = None,
    stop: StopRequest | None = None,
) -> JobResult:
    """Run one config into `job_dir`; `model_choice` is the `model=` option picked, `digest` its
    job_digest if the caller has it (computing it reads the prompt file). A composed DictConfig
    (Hydra's compose, in a test or a notebook) is typed here first (config.typed). With `stop`,
    a stop the scheduler asked for ends the job between batches (Stopped), once the writer
    has committed every batch handed to it.

    Batches an earlier run of the same config committed are kept (cfg.resume); the rest are
    generated here and handed to the writer, which renders, writes and commits them in a
    worker process while the next batch generates (writer.py)."""
    cfg = schema.typed(cfg)
    prompts = load_prompts(cfg.prompts, cfg.prompt, schema.DEFAULT_PROMPT)
    resolved = schema.resolved_dict(cfg)
    delivery = Delivery(_extra_sinks(cfg))
    store = Store(job_dir)
    kept = store.prepare(digest or job_digest(cfg), cfg.resume)
    atomic_write_text(job_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(resolved))
    _library_bars(_bars_on(cfg))
    clock = time.perf_counter()
    loaded = model_loader.load(cfg.model, cfg.device.type)
    support.check(loaded.model)  # exact or refused, before anything is generated
    lens_mode = lens.mode(cfg.metrics.logit_lens)
    support.check_logit_lens(loaded.model, lens_mode)
    extras = user_metrics(cfg.metrics.extra, loaded.model) + per_head_metrics(cfg.metrics.per_head, loaded.model)
    capturing = Capturing(lens_mode, extras, ModelFacts.probe(loaded.model, lens_mode))
    timings = {"load_s": time.perf_counter() - clock, "generate_s": 0.0}
    _check_chat_template(cfg, loaded)
    _check_context(prompts, loaded, cfg.sampling.max_new_tokens, cfg.chat_template, cfg.system_prompt)
    model_info = _model_info(loaded, model_choice).model_dump()
    done = set(store.committed())
    starts = [s for s in range(0, len(prompts), cfg.batch_size) if s not in done]
    prompts_kept = len(prompts) - sum(len(prompts[s : s + cfg.batch_size]) for s in starts)
    if kept:
        log.info("resuming: %d batch(es) of %d prompt(s) kept from an earlier run", kept, prompts_kept)
    writer = None

    vocab = Vocabulary(loaded.tokenizer, loaded.model.config.get_text_config().vocab_size)  # every token's text

    def make_writer(mode: str) -> JobWriter:
        return JobWriter(store, cfg.traces.format, delivery, vocab, resolved, len(prompts), mode, extras)

    # the first batch times torch's last thread, if where the writer runs depends on it
    trial = None
    if asks_threads(loaded.device, len(starts), threads.chosen(cfg.threads)):
        first = len(prompts[starts[0] : starts[0] + cfg.batch_size])  # the batch the trial runs on
        rows_per_step = first * cfg.num_samples * loaded.model.config.get_text_config().num_hidden_layers
        trial = threads.StepTrial(rows_per_step * COST_PER_ROW)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress(cfg, len(prompts), desc="prompts", unit="prompt", initial=prompts_kept))
        stack.enter_context(_logs_above(bar))
        for start in starts:
            if stop is not None:
                stop.check()
            batch = prompts[start : start + cfg.batch_size]
            clock = time.perf_counter()
            caps = _generate(
                cfg, loaded, batch, capturing, stop=writer.failed if writer else None, timer=None if writer else trial
            )
            took = time.perf_counter() - clock
            timings["generate_s"] += took
            if writer is None:  # after the first batch: where the writer runs (writer_mode)
                clock = time.perf_counter()
                mode = _writer_mode(cfg, loaded, batch, caps, took, len(starts), capturing, trial)
                timings["writer_choice_s"] = time.perf_counter() - clock
                writer = stack.enter_context(make_writer(mode))
            writer.put(
                Batch(
                    start,
                    caps,
                    [
                        _header(cfg, prompt, job_dir, model_info, sample)  # by prompt, then sample
                        for prompt in batch
                        for sample in range(cfg.num_samples)
                    ],
                )
            )
            bar.update(len(batch))
        writer = writer or stack.enter_context(make_writer("inline"))  # nothing left to generate: the kept parts
        clock = time.perf_counter()
        totals = writer.finish()
        timings.update(
            writer_busy_s=writer.busy_s,
            writer_wait_s=time.perf_counter() - clock,
            writer=writer.mode,
            torch_threads=threads.current(),
        )
    store.remove()
    return JobResult(
        job_dir,
        cfg.traces.format,
        totals.traces,
        totals.rows,
        totals.warnings,
        totals.warning_count,
        delivery.failures,
        next(iter(delivery.gave_up.values()), None),
        {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},
    )


def _writer_mode(
    cfg: CoreVitalConfig,
    loaded: LoadedModel,
    batch: list[Prompt],
    caps,
    seconds: float,
    batches: int,
    capturing: "Capturing",
    trial: threads.StepTrial | None,
) -> str:
    """writer.writer_mode for this job, from its first batch: the rows it made against the
    seconds it took estimate the writer's share of the work (writer.COST_PER_ROW); `trial`
    timed torch's last thread on its decode steps."""
    if trial is not None:
        trial.end()
    rows = sum(len(c.token_ids) * c.num_layers for c in caps)
    return writer_mode(
        loaded.device,
        batches,
        threads.chosen(cfg.threads),
        rows * COST_PER_ROW / max(seconds, 1e-9),
        lambda share: _spare_core(cfg, loaded, batch, capturing, trial, share),
    )


def _spare_core(
    cfg: CoreVitalConfig,
    loaded: LoadedModel,
    batch: list[Prompt],
    capturing: "Capturing",
    trial: threads.StepTrial,
    share: float,
) -> bool:
    """trial.spare(share); a first batch too short to decide is generated once more, captured as
    the job captures it, for enough greedy tokens (the output is dropped)."""
    if not trial.enough():
        trial = threads.StepTrial()
        longer = SamplingConfig(max_new_tokens=2 * threads.MIN_STEPS + 2, do_sample=False)
        _capture(cfg, loaded, batch, capturing, longer, on_step=trial)
        trial.end()
    return trial.spare(share)


def _header(cfg: CoreVitalConfig, prompt: Prompt, job_dir: Path, model_info: dict, sample: int = 0) -> TraceHeader:
    return TraceHeader(
        trace_id=uuid.uuid4().hex,
        created_at_utc=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        model=model_info,
        run_config=_run_config_info(cfg, prompt, job_dir, sample),
        prompt=prompt,
    )


STEP_BAR_MIN_TOKENS = 64  # shorter generations get only the per-prompt bar


def _bars_on(cfg: CoreVitalConfig) -> bool:
    return bool(cfg.progress) and sys.stderr.isatty()


def _library_bars(on: bool) -> None:
    """transformers' own bars (e.g. "Loading weights") follow the same rule as ours."""
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


def _progress(cfg: CoreVitalConfig, total: int, disable: bool = False, **kwargs):
    """A progress bar on stderr, silent when stderr is not a terminal or with progress=false."""
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=disable or not _bars_on(cfg), dynamic_ncols=True, **kwargs)


def _logs_above(bar):
    """While a bar is shown, log lines go above it instead of through it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return contextlib.nullcontext() if bar.disable else logging_redirect_tqdm(loggers=[logging.getLogger()])


def _generate(cfg: CoreVitalConfig, loaded: LoadedModel, batch: list[Prompt], capturing: "Capturing", stop, timer=None):
    """One `generate` call under capture, with a per-token bar for long generations; it ends
    early once `stop()` is true (the writer failed: the job is failing anyway). `timer`, if
    given, is called after each token too (threads.StepTrial)."""
    n = cfg.sampling.max_new_tokens
    with _progress(cfg, n, desc="tokens", unit="tok", leave=False, disable=n < STEP_BAR_MIN_TOKENS) as steps:
        calls = [f for f in (None if steps.disable else steps.update, timer) if f is not None]
        on_step = None if not calls else calls[0] if len(calls) == 1 else lambda: [f() for f in calls]
        return _capture(cfg, loaded, batch, capturing, cfg.sampling, cfg.num_samples, on_step=on_step, stop=stop)


def _capture(
    cfg: CoreVitalConfig,
    loaded: LoadedModel,
    batch: list[Prompt],
    capturing: Capturing,
    sampling: SamplingConfig,
    num_samples: int = 1,
    on_step=None,
    stop=None,
):
    """generate_with_capture for a batch of the job's prompts, as the job captures them (its
    chat template, lens, user metrics and model facts), with `sampling`."""
    return generate_with_capture(
        loaded.model,
        loaded.tokenizer,
        [p.text for p in batch],
        sampling,
        cfg.seed,
        on_step=on_step,
        stop=stop,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        num_samples=num_samples,
        lens=capturing.lens,
        extras=capturing.extras,
        facts=capturing.facts,
    )


def _check_chat_template(cfg: CoreVitalConfig, loaded: LoadedModel) -> None:
    """chat_template=true needs a tokenizer that has one: fail before generating if it has none."""
    if cfg.chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        raise ConfigError(
            f"chat_template=true but the tokenizer of {loaded.model_id} has no chat template; "
            f"use chat_template=false or a chat (instruct) model"
        )


def _check_context(
    prompts: list[Prompt],
    loaded: LoadedModel,
    max_new_tokens: int,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> None:
    """Fail before generating if a prompt (its tokens as generated from: templated with
    chat_template) plus its new tokens cannot fit the model's positions."""
    window = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if not window:
        return
    ids = prompt_token_ids(loaded.tokenizer, [p.text for p in prompts], chat_template, system_prompt)
    lengths = [len(i) for i in ids]
    for prompt, n in zip(prompts, lengths):
        if n + max_new_tokens > window:
            raise PromptError(
                f"prompt {prompt.index} ({prompt.source}) has {n} tokens; with "
                f"sampling.max_new_tokens={max_new_tokens} "
                f"that is {n + max_new_tokens}, more than the model's context window of {window} positions; "
                f"shorten the prompt or lower sampling.max_new_tokens"
            )


def per_head_metrics(on: bool, model) -> tuple[metrics.PerHead, ...]:
    """`metrics.per_head`: the per-head columns' declarations for the model's query heads (none
    when off); one sentence (exit 2) for a model whose layers do not all have one head count."""
    if not on:
        return ()
    try:
        return (metrics.PerHead(query_heads(model)),)
    except ValueError as e:
        raise ConfigError(f"{e}; run this model with metrics.per_head=false") from None


def user_metrics(specs, model) -> tuple[metrics.UserMetric, ...]:
    """`metrics.extra`: each entry instantiated by Hydra from its `_target_` and parameters, and
    bound to the loaded model; a bad one is one sentence (exit 2) before anything is generated."""
    from hydra.utils import instantiate

    out, names = [], set(metrics.OUTPUTS)
    taken = {f.name for f in table.SCHEMA} | {m.column for m in metrics.PerHead(1).metrics}
    blocks = model.config.get_text_config().num_hidden_layers
    for spec in specs or []:
        target = spec.get("_target_") if hasattr(spec, "get") else None
        if not target:
            raise ConfigError(f"each metrics.extra entry needs a _target_ class (got {spec})")
        try:
            metric = instantiate(spec)
            if not isinstance(metric, metrics.UserMetric):
                raise ValueError("it is not a corevital.core.metrics.UserMetric subclass")
            outside = [l for l in metric.layers or () if not 0 <= l < blocks]
            if outside:
                raise ValueError(f"layer {outside[0]} is not one of the model's {blocks} blocks (0..{blocks - 1})")
            metric.bind(model)
        except Exception as e:
            raise ConfigError(f"metrics.extra {target}: {e.__cause__ or e}") from None
        clash = [m.column for m in metric.metrics if m.column in taken]
        if clash or any(m.reducer != metric.name for m in metric.metrics) or metric.name in names:
            raise ConfigError(
                f"metrics.extra {target}: its columns {clash or [m.column for m in metric.metrics]} or "
                f"its name {metric.name!r} clash with another metric's; give it another name"
            )
        taken.update(m.column for m in metric.metrics)
        names.add(metric.name)
        out.append(metric)
    return tuple(out)


def _extra_sinks(cfg: CoreVitalConfig) -> list[Sink]:
    """The sinks besides the job dir: `sink=http`, and a `sink._target_` class."""
    s, sinks = cfg.sink, []
    if s.type == "http":
        sinks.append(HTTPSink(s.url, s.timeout_s, s.retries, s.backoff_s, s.token_env, s.allow_plain_http))
    if s._target_:
        from hydra.utils import instantiate

        try:
            sink = instantiate({"_target_": s._target_, **s.params})
        except Exception as e:
            raise ConfigError(f"sink._target_={s._target_} could not be instantiated: {e.__cause__ or e}") from None
        if not isinstance(sink, Sink):
            raise ConfigError(f"sink._target_={s._target_} is not a corevital.output.sinks.Sink subclass")
        sinks.append(sink)
    return sinks


def _model_info(loaded: LoadedModel, choice: str) -> ModelInfo:
    c = loaded.model.config.get_text_config()
    return ModelInfo(
        name=choice,
        hf_id=loaded.model_id,
        revision=loaded.revision,
        architecture=type(loaded.model).__name__,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        tokenizer_hf_id=loaded.model_id,
        dtype=loaded.dtype,
        device=str(loaded.device),
    )


def _run_config_info(cfg: CoreVitalConfig, prompt: Prompt, job_dir: Path, sample: int = 0) -> RunConfigInfo:
    s = cfg.sampling
    return RunConfigInfo(
        seed=cfg.seed,
        device_requested=cfg.device.type,
        max_new_tokens=s.max_new_tokens,
        batch_size=cfg.batch_size,
        generation=GenerationInfo(do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
        prompt_source=prompt.source,
        prompt_index=prompt.index,
        sample_index=sample,
        num_samples=cfg.num_samples,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        sketch=dict(summaries.SKETCH_RECIPE),
        sink={
            "type": cfg.sink.type,
            "target": cfg.sink.url if cfg.sink.type == "http" else str(job_dir / TRACES_DIR),
            **({"custom": cfg.sink._target_} if cfg.sink._target_ else {}),
        },
    )


def job_digest(cfg: CoreVitalConfig) -> str:
    """What a finished job's marker must match to be skipped: the resolved config, the
    prompt file's bytes (an edited file reruns) and the output schema version."""
    extra = SCHEMA_VERSION
    if cfg.prompts and Path(cfg.prompts).is_file():
        extra += hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()
    return jobs.config_hash(schema.resolved_dict(cfg), extra)


@hydra.main(config_path=schema.config_dir(), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        with job_lock(job_dir):
            _main(cfg, hc, job_dir, sweeping)
    except JobLocked as e:  # another live process writes this job dir: leave it alone
        _report(e, job_dir.name if sweeping else None, debug=_debug(hc))
        if not sweeping:
            raise SystemExit(2) from None


def _process_age() -> float | None:
    """Seconds since this process started (Linux), for the job's timings: imports and Hydra's setup."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _main(cfg: DictConfig, hc, job_dir: Path, sweeping: bool) -> None:
    started = time.perf_counter()
    startup = _process_age()
    record = jobs.JobRecord(job_dir, list(hc.overrides.task), "", slurm=slurm.ids())
    tracker = None
    try:
        cfg = schema.typed(cfg)
        record.digest = job_digest(cfg)
        if cfg.resume and jobs.is_done(job_dir, record.digest):
            record.skipped()
            log.info("skipped: finished earlier with the same config (resume=false reruns it)")
            print(f"corevital: {job_dir.name}: skipped, already done ({job_dir})")
            return
        earlier = jobs.read_json(job_dir / jobs.STATUS) or {}
        # a run of this job that did not finish (requeued, interrupted, failed) is continued in its tracker run
        previous = earlier.get("tracker") if earlier.get("status") != "done" else None
        record.start()
        if record.slurm:
            log.info("%s", slurm.describe(record.slurm))
        tracker = _open_tracker(cfg, hc, job_dir, sweeping, previous)
        record.tracker = tracker.ref if tracker else None
        used = threads.apply(cfg.threads)
        if used:
            log.info("torch uses %d CPU thread(s)", used)
        # under SLURM, its signals stop the job between batches (stopping.py)
        with StopRequest() if record.slurm else contextlib.nullcontext() as stop:
            result = run_job(cfg, job_dir, hc.runtime.choices.get("model") or "custom", record.digest, stop)
        if startup is not None and not sweeping:
            result.timings["startup_s"] = round(startup, 3)  # process start to this job: imports, Hydra
        if result.undelivered and cfg.sink.required:
            raise DeliveryError(
                f"{result.undelivered} of {result.traces} trace(s) could not be delivered "
                f"({result.delivery_error}); they are kept in {job_dir / TRACES_DIR}; "
                f"sink.required=false makes this a warning"
            )
        if tracker:
            tracker.log(_job_metrics(result), [job_dir / TRACES_PARQUET])
            tracker.end(ok=True)
            tracker = None
        record.done(
            result.outputs,
            traces=result.traces,
            rows=result.rows,
            warnings=result.warnings,
            warning_count=result.warning_count,
            traces_format=result.traces_format,
            timings=result.timings,
        )
    except (*USER_ERRORS, DeliveryError, OutputError) as e:
        _end_quietly(tracker)
        record.failed(e)
        _report(
            _with_kept(e, job_dir) if isinstance(e, OutputError) else e,
            job_dir.name if sweeping else None,
            debug=_debug(hc),
        )
        if not sweeping:
            raise SystemExit(2 if isinstance(e, USER_ERRORS) else 1) from None
        return
    except Stopped as e:
        record.failed(e, status="interrupted")
        kept = Store(job_dir).committed_traces()
        log.warning("%s; %d whole trace(s) kept, a rerun resumes after them", e, kept)
        print(f"corevital: {job_dir.name}: {e}; {kept} whole trace(s) kept", file=sys.stderr)
        stop.follow()  # the time-limit signal: submitit requeues the task; SIGTERM: exit
    except KeyboardInterrupt as e:
        _end_quietly(tracker)
        record.failed(e, status="interrupted")
        print(
            f"corevital: interrupted; {Store(job_dir).committed_traces()} whole trace(s) kept in "
            f"{job_dir}, no tables written "
            f"(a rerun with the same config generates only the rest)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except Exception as e:
        _end_quietly(tracker)
        record.failed(e)
        if not sweeping:
            raise
        log.exception("job failed")  # the traceback goes to the job's log; the sweep goes on
        print(f"corevital: error: {job_dir.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return
    for w in result.warnings:
        print(f"corevital: warning: {w}", file=sys.stderr)
    if result.warning_count > len(result.warnings):
        print(
            f"corevital: warning: {result.warning_count - len(result.warnings)} more in traces.parquet's "
            f"warnings column",
            file=sys.stderr,
        )
    where = (
        f"in {result.job_dir / TRACES_DIR}" if result.traces_format != "none" else "(traces.format=none: tables only)"
    )
    print(
        f"corevital: {result.traces} trace(s) {where}, "
        f"{result.rows} rows in {result.parquet_path} ({time.perf_counter() - started:.1f} s)"
    )


def _open_tracker(cfg: CoreVitalConfig, hc, job_dir: Path, sweeping: bool, previous: dict | None):
    """The job's tracker run (None for tracker=none), before anything is loaded: params are the
    job's overrides as given; a requeued or resumed run of the job reuses `previous`."""
    params = dict(jobs.split_override(o) for o in hc.overrides.task)
    home = job_dir.parent if sweeping else job_dir
    return trackers.open_run(cfg.tracker, home, job_dir.name, params, previous)


def _job_metrics(result: JobResult) -> dict[str, float]:
    return trackers.job_metrics(
        result.job_dir / TRACES_PARQUET, result.traces, result.rows, float(result.timings.get("generate_s", 0.0))
    )


def _end_quietly(tracker) -> None:
    """Mark a failed job's tracker run failed; a tracker error then is logged, not raised over the job's own."""
    if tracker is not None:
        try:
            tracker.end(ok=False)
        except trackers.TrackerError as e:
            log.warning("%s", e)


def _with_kept(error: OutputError, job_dir: Path) -> str:
    return (
        f"{error}; the {Store(job_dir).committed_traces()} trace(s) finished before it are kept "
        f"(a rerun resumes after them)"
    )


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
    """Entry point. Lets `-m` stand anywhere, as in `corevital.runner.app model=gpt2 -m seed=1,2,3`:
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


def exit_without_teardown(entry) -> None:
    """Run `entry()`, then end the process at once, its outputs flushed: the interpreter's own
    teardown of torch, transformers and their thousands of modules takes 1 to 1.5 s that
    a user would otherwise wait for after the job has finished. An uncaught exception still
    goes through the normal exit (traceback), and so does a multirun: its launcher may have
    worker processes (joblib) that only the normal exit shuts down."""
    if any(a in MULTIRUN_FLAGS for a in sys.argv[1:]):
        return entry()
    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(cli)
