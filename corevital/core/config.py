"""Config schema: the typed shape of everything Hydra composes.

The dataclasses are registered in Hydra's ConfigStore as `corevital_schema`, which
`conf/config.yaml` lists first, so a misspelt key or a wrong type fails while composing,
and `check_complete` catches missing mandatory values (`???`) at job start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class ModelConfig:
    # hub id, local directory, path to a .gguf file, or "embedded:<distribution>/<file.gguf>"
    name_or_path: str = MISSING
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    trust_remote_code: bool = False
    # pickle-based weight files (.bin, .pt, .pth) can run code when loaded: refused unless true
    allow_pickle: bool = False
    # null: float32 on the CPU, the checkpoint's own dtype on CUDA
    dtype: Optional[str] = None
    # placement by accelerate, as in transformers: null (the whole model on `device`), auto, or
    # a mapping of module names to cpu | cuda:N | disk; max_memory e.g. {cpu: 2GB, 0: 20GB};
    # offload_folder holds the layers placed on disk. Both mappings are typed Any because
    # OmegaConf cannot merge an override into a typed dict whose default is null;
    # model/loader.py's placement checks them.
    device_map: Optional[Any] = None
    max_memory: Optional[Any] = None  # Dict[str, str]
    offload_folder: Optional[str] = None


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto | cpu | cuda


@dataclass
class SamplingConfig:
    do_sample: bool = True
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 20


@dataclass
class SinkConfig:
    type: str = "local"  # local | http
    url: Optional[str] = None
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5
    token_env: Optional[str] = "COREVITAL_HTTP_TOKEN"  # the NAME of the variable holding the token
    required: bool = True  # delivery failure fails the job (false: a warning in the trace and status)
    allow_plain_http: bool = False  # a token may go over plain http:// to a host other than this machine
    # any corevital.output.sinks.Sink subclass, instantiated by Hydra with `params` as keyword arguments
    _target_: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackerConfig:
    """Where each job is logged as one run besides its files (docs/trackers.md)."""

    type: str = "none"  # none | mlflow | wandb
    uri: Optional[str] = None  # mlflow: the tracking URI; null: sqlite:///<sweep or run dir>/mlflow.db
    experiment: Optional[str] = None  # mlflow: null is the sweep (or run) dir's name
    project: Optional[str] = None  # wandb: null is the sweep (or run) dir's name
    mode: str = "offline"  # wandb: offline (files only, `wandb sync` uploads them) | online


@dataclass
class TracesConfig:
    # json: the canonical trace per prompt; json.gz: the same, gzip-compressed; none: tables only
    format: str = "json"


@dataclass
class HealthConfig:
    """Thresholds of the health flags (corevital/assess/health.py declares each flag and the reason
    for its default; docs/evaluate.md's flag table is generated from those declarations)."""

    # repetition_loop: a 4-gram of generated tokens occurs at least loop_min_repeats times
    loop_ngram: int = 4
    loop_min_repeats: int = 3
    # entropy_spike: a generated step's next-token entropy exceeds the median of the trace's
    # generated steps by more than this many nats
    entropy_spike_nats: float = 4.0
    # attention_collapse: a layer's mean head attention entropy (nats) is below this at a
    # generated step with at least attn_collapse_min_keys keys: every head reads one key
    attn_collapse_entropy: float = 0.005
    attn_collapse_min_keys: int = 16
    # hidden_norm_explosion: a generated step's hidden-state L2 norm exceeds this many times
    # that layer's median over the trace's rows 2..T-1 (position 0 left out)
    norm_explosion_factor: float = 20.0


LENS_MODES = ("generated", "all")  # metrics.logit_lens other than false


def logit_lens_mode(value) -> str | None:
    """metrics.logit_lens -> None (off: false, also a quoted 'false'), "generated" or "all";
    ConfigError for anything else."""
    if value is False or (isinstance(value, str) and value.lower() == "false"):
        return None
    if isinstance(value, str) and value in LENS_MODES:
        return value
    raise ConfigError(f"metrics.logit_lens must be false, generated or all (got {value!r})")


@dataclass
class MetricsConfig:
    """Optional metrics, off by default because they cost generation time."""

    # logit lens (docs/format.md: lens_entropy, lens_top1_match, lens_kl): false (off),
    # generated (the generated rows only) or all (every row). Union[bool, str] so that
    # `metrics.logit_lens=false` parses as a bool and the modes as strings.
    logit_lens: Union[bool, str] = False
    # user metrics (metrics.UserMetric), each {_target_: class path, ...its parameters}; e.g.
    # {_target_: corevital.assess.probes.LinearProbe, path: probe.safetensors, layer: 12, name: truth}
    extra: List[Any] = field(default_factory=list)
    # one value per query head of each layer (docs/format.md, "Per-head attention"): head_attn_entropy,
    # head_sink_mass, head_prev_mass, head_prompt_mass, head_self_mass; RAUQ as published reads them
    per_head: bool = False


@dataclass
class CoreVitalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    prompts: Optional[str] = None  # path to a .txt or .jsonl prompt file
    prompt: Optional[str] = None  # one prompt's text
    seed: int = "${oc.decode:${oc.env:COREVITAL_SEED,42}}"  # type: ignore[assignment]
    batch_size: int = 1
    # true: each prompt is one user message in the tokenizer's chat template (after a system
    # message when system_prompt is set), tokenized as apply_chat_template(..., add_generation_prompt=True)
    chat_template: bool = False
    system_prompt: Optional[str] = None
    # continuations per prompt, from one generate call (num_return_sequences); each is its own trace
    num_samples: int = 1
    resume: bool = True  # skip a job whose done.json matches its config; false reruns it
    progress: bool = True  # progress bars on stderr (only when it is a terminal)
    # torch's CPU threads; null: all cores for a job alone, its share of them when a local
    # launcher (submitit_local, joblib) runs jobs side by side, SLURM_CPUS_PER_TASK under SLURM
    threads: Optional[int] = None


DEFAULT_PROMPT = "Explain in one sentence what a language model is."
CONF_DIR_NAME = "conf"


def register() -> None:
    ConfigStore.instance().store(name="corevital_schema", node=CoreVitalConfig)


def quote_value(value: str) -> str:
    """`value` as a quoted Hydra override value: one string whatever it holds (commas, colons,
    quotes, `=`), e.g. `prompt=` + quote_value("it's a=b")."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def config_dir() -> str:
    """Absolute path of `conf/`: the repo's copy (editable install) or the packaged one."""
    package = Path(__file__).resolve().parents[1]  # corevital/
    for candidate in (package.parent / CONF_DIR_NAME, package / CONF_DIR_NAME):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"CoreVital's conf/ directory is missing next to {package}")


class ConfigError(ValueError):
    """A config value that cannot work; the message says what and how to fix it."""


def check_complete(cfg: DictConfig) -> None:
    """Fail at job start on missing mandatory values and on values no run can use."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing mandatory config value(s): {', '.join(missing)}; set them on the command line, "
            f"e.g. {missing[0]}=..."
        )
    s = cfg.sampling
    if s.max_new_tokens < 1:
        raise ConfigError(f"sampling.max_new_tokens must be >= 1 (got {s.max_new_tokens})")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1 (got {cfg.num_samples})")
    if cfg.num_samples > 1 and not s.do_sample:
        raise ConfigError(
            f"num_samples={cfg.num_samples} needs sampling, since greedy decoding gives the same continuation "
            f"every time; use sampling=default or num_samples=1"
        )
    if cfg.system_prompt is not None and not cfg.chat_template:
        raise ConfigError(
            "system_prompt is only used inside a chat template; add chat_template=true or drop system_prompt"
        )
    if s.do_sample and s.temperature <= 0:
        raise ConfigError(
            f"sampling.temperature must be > 0 when sampling (got {s.temperature}); use "
            "sampling=greedy for argmax decoding"
        )
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"sampling.top_p must be in (0, 1] (got {s.top_p})")
    if s.top_k < 0:
        raise ConfigError(f"sampling.top_k must be >= 0 (got {s.top_k}); 0 disables top-k")
    if cfg.device.type not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda (got {cfg.device.type!r})")
    if cfg.tracker.type not in ("none", "mlflow", "wandb"):
        raise ConfigError(f"tracker must be none, mlflow or wandb (got {cfg.tracker.type!r})")
    if cfg.tracker.mode not in ("offline", "online"):
        raise ConfigError(f"tracker.mode must be offline or online (got {cfg.tracker.mode!r})")
    if cfg.sink.type not in ("local", "http"):
        raise ConfigError(f"sink must be local or http (got {cfg.sink.type!r})")
    if cfg.sink.type == "http" and not cfg.sink.url:
        raise ConfigError("sink=http needs a URL: add sink.url=http://host:port/path")
    if cfg.sink.type == "http" and not str(cfg.sink.url).startswith(("http://", "https://")):
        raise ConfigError(f"sink.url must start with http:// or https:// (got {cfg.sink.url!r})")
    if cfg.sink.retries < 0 or cfg.sink.timeout_s <= 0:
        raise ConfigError("sink.retries must be >= 0 and sink.timeout_s > 0")
    if cfg.traces.format not in ("json", "json.gz", "none"):
        raise ConfigError(f"traces.format must be json, json.gz or none (got {cfg.traces.format!r})")
    h = cfg.health
    if h.loop_ngram < 1 or h.loop_min_repeats < 2:
        raise ConfigError(
            f"health.loop_ngram must be >= 1 and health.loop_min_repeats >= 2 (got {h.loop_ngram}, "
            f"{h.loop_min_repeats})"
        )
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1 (got {cfg.threads})")
    if cfg.prompt is not None and cfg.prompts is not None:
        raise ConfigError("give either prompt=... or prompts=FILE, not both")
    if logit_lens_mode(cfg.metrics.logit_lens) is None:
        cfg.metrics.logit_lens = False  # a quoted 'false': the same setting, the same job digest


def typed(cfg: DictConfig | CoreVitalConfig) -> CoreVitalConfig:
    """The Hydra edge: a composed config, checked (check_complete), as one typed CoreVitalConfig
    of plain values (every interpolation resolved, mappings as dicts); everything below the
    Hydra app takes this object or plain arguments taken from it. A CoreVitalConfig passes through."""
    if isinstance(cfg, CoreVitalConfig):
        return cfg
    check_complete(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def resolved_dict(config: CoreVitalConfig) -> dict[str, Any]:
    """The config as plain data (written as the job's resolved config and hashed for its digest)."""
    return dataclasses.asdict(config)
