"""Model loading: hub id, local directory, GGUF file, or the embedded default.

One model stays loaded per process, so a sequential multirun (Hydra's basic launcher runs
every job in one process) loads each model once when jobs of one model run together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corevital.core.config import ModelConfig
from corevital.core.files import cache_dir
from corevital.model import embedded

log = logging.getLogger("corevital")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_REFUSED = (
    "its weights are pickle files ({files}), which can run arbitrary code when loaded, so CoreVital "
    "refuses them; convert the checkpoint to safetensors, or set model.allow_pickle=true if you trust it"
)


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded here; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    model_id: str  # what was loaded: hub id, path, or embedded:<dist>/<file>
    revision: str | None  # hub commit, else "sha256:<hex>" of the weights
    device: torch.device
    dtype: str


def resolve_device(kind: str) -> torch.device:
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError(
            "device=cuda was requested but CUDA is not available on this machine; use device=cpu or device=auto"
        )
    return torch.device(kind)


def resolve_dtype(name: str | None, device: torch.device) -> Any:
    if name is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelUnavailableError(f"model.dtype={name!r} is not a torch dtype; use e.g. float32, bfloat16 or float16")
    return dtype


PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map strings


def placement(cfg: ModelConfig) -> dict:
    """from_pretrained's placement arguments for model.device_map, max_memory and offload_folder,
    checked before anything loads: {} without a device_map (the whole model then goes to `device`)."""
    from omegaconf import OmegaConf

    def plain(x):
        return OmegaConf.to_container(x) if OmegaConf.is_config(x) else x

    device_map, max_memory, folder = (
        plain(getattr(cfg, k, None)) for k in ("device_map", "max_memory", "offload_folder")
    )
    if device_map is None:
        if max_memory is not None or folder is not None:
            raise ModelUnavailableError(
                "model.max_memory and model.offload_folder only apply with a model.device_map (e.g. "
                "model.device_map=auto)"
            )
        return {}
    if isinstance(device_map, dict):
        device_map = {str(k): _map_device(v) for k, v in device_map.items()}
        if "disk" in device_map.values() and folder is None:
            raise ModelUnavailableError(
                "model.device_map places modules on disk, so it needs model.offload_folder (a "
                "directory for their weights)"
            )
    elif device_map not in PLACEMENT_STRATEGIES:
        raise ModelUnavailableError(
            f"model.device_map={device_map!r} is neither {', '.join(PLACEMENT_STRATEGIES)} nor a "
            "mapping of module names to devices"
        )
    kwargs = {"device_map": device_map}
    if max_memory is not None:
        if not isinstance(max_memory, dict):
            raise ModelUnavailableError(
                f"model.max_memory={max_memory!r} is not a mapping of devices to sizes, e.g. {{cpu: 2GB, 0: 20GB}}"
            )
        kwargs["max_memory"] = {_memory_key(k): v if isinstance(v, int) else str(v) for k, v in max_memory.items()}
    if folder is not None:
        kwargs["offload_folder"] = str(folder)
    return kwargs


def _map_device(value: Any) -> str:
    """One device_map value -> "cpu", "disk" or "cuda:N", checked against this machine's GPUs."""
    name = f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    name = "cuda:0" if name == "cuda" else name
    if name in ("cpu", "disk"):
        return name
    index = name.removeprefix("cuda:")
    if not (name.startswith("cuda:") and index.isdigit()):
        raise ModelUnavailableError(
            f"model.device_map names the device {value!r}; use cpu, disk, cuda:N or N (a GPU index)"
        )
    if int(index) >= torch.cuda.device_count():
        raise ModelUnavailableError(
            f"model.device_map names {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return name


def _memory_key(key: Any) -> Any:
    """A max_memory key as accelerate wants it: a GPU as its index (int), else "cpu", "mps" or "disk"."""
    key = str(key).removeprefix("cuda:")
    if key.isdigit():
        return int(key)
    if key not in ("cpu", "mps", "disk"):
        raise ModelUnavailableError(
            f"model.max_memory names the device {key!r}; use cpu, disk or a GPU index (0 or cuda:0)"
        )
    return key


_CACHE: dict[tuple, LoadedModel] = {}


def load(model_cfg: ModelConfig, device_kind: str) -> LoadedModel:
    """Load (or reuse) the model a config names, on the requested device (or placed by its
    device_map), in eval mode."""
    device = resolve_device(device_kind)
    place = placement(model_cfg)
    key = (
        model_cfg.name_or_path,
        model_cfg.revision,
        model_cfg.gguf_file,
        model_cfg.dtype,
        bool(model_cfg.trust_remote_code),
        bool(model_cfg.allow_pickle),
        str(device),
        repr(place),
    )
    if key not in _CACHE:
        _CACHE.clear()  # keep one model per process: sweeps are ordered model-first
        start = time.perf_counter()
        _CACHE[key] = _load(model_cfg, device, place)
        log.info("loaded model %s on %s in %.2f s", _CACHE[key].model_id, device, time.perf_counter() - start)
    return _CACHE[key]


def _load(cfg: ModelConfig, device: torch.device, place: dict) -> LoadedModel:
    """place: placement(cfg); with a device_map accelerate has placed the model, and `device`
    only picks the default dtype."""
    from corevital.model.introspect import execution_device

    source, model_id, revision, extra = _locate(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(revision=cfg.revision, trust_remote_code=bool(cfg.trust_remote_code), **extra)
    tokenizer, model = _from_pretrained(source, dtype, kwargs, cfg.name_or_path, bool(cfg.allow_pickle), place)
    if not place:
        model.to(device)
    model.eval()
    if revision is None:
        revision = getattr(model.config, "_commit_hash", None) or cfg.revision
    return LoadedModel(
        model,
        tokenizer,
        model_id,
        revision,
        execution_device(model) if place else device,
        str(model.dtype).removeprefix("torch."),
    )


def _from_pretrained(source: str, dtype: Any, kwargs: dict, name: str, allow_pickle: bool, place: dict | None = None):
    """(tokenizer, model), from local files first: a cached hub model loads without the network.
    Safetensors only, unless allow_pickle. `place`: placement() arguments, for the model only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).exists()
    if local and not allow_pickle:
        _refuse_pickle(Path(source), name)
    model_kwargs = {**kwargs, **({} if allow_pickle else {"use_safetensors": True})}
    hub_down = _offline()
    for local_only in (True,) if hub_down or local else (True, False):
        if not local_only and not _hub_reachable():
            hub_down = True
            break
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
            return tokenizer, AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=local_only, **model_kwargs, **(place or {})
            )
        except (OSError, ValueError) as e:  # transformers says "missing or unusable files" with either
            error = e
            if not allow_pickle and "safetensors" in str(e) and not local_only:
                raise ModelUnavailableError(
                    f"model {name!r}: it has no safetensors weights; " + PICKLE_REFUSED.format(files="on the hub")
                ) from None
    if local:
        raise ModelUnavailableError(f"model {name!r} could not be loaded from {source}: {str(error).splitlines()[0]}")
    raise ModelUnavailableError(_unavailable_message(name, error, hub_down))


def _refuse_pickle(directory: Path, name: str) -> None:
    if not directory.is_dir():
        return
    names = [f.name for f in directory.iterdir() if f.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return  # transformers prefers these and never opens the pickles beside them (use_safetensors=True)
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args"))
    if pickles:
        raise ModelUnavailableError(
            f"model {name!r} was not loaded: " + PICKLE_REFUSED.format(files=", ".join(pickles))
        )


def _locate(cfg: ModelConfig) -> tuple[str, str, str | None, dict]:
    """(what to pass to from_pretrained, model_id, revision if known now, extra kwargs)."""
    name = cfg.name_or_path
    if name.startswith(embedded.PREFIX):
        dist, _, file = name[len(embedded.PREFIX) :].partition("/")
        try:
            path, revision = embedded.converted_dir(dist, file or cfg.gguf_file)
        except FileNotFoundError as e:
            raise ModelUnavailableError(str(e)) from None
        return str(path), f"{embedded.PREFIX}{dist}=={embedded.md.version(dist)}/{file or cfg.gguf_file}", revision, {}
    gguf = _local_gguf(name, cfg.gguf_file)
    if gguf is not None:
        path, revision = embedded.converted_gguf(gguf)
        return str(path), str(gguf), revision, {}
    if Path(name).is_dir():
        return name, str(Path(name).resolve()), cfg.revision or weights_hash(Path(name)), {}
    if name.endswith(".gguf") or name.startswith(("/", "./", "../", "~")):
        raise ModelUnavailableError(f"model path {name!r} does not exist; check model.name_or_path")
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return name, name, None, extra


def _local_gguf(name: str, gguf_file: str | None) -> Path | None:
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return p.resolve()
    if gguf_file and p.is_dir():
        f = p / gguf_file
        if not f.is_file():
            raise ModelUnavailableError(f"GGUF file {str(f)!r} does not exist; check model.gguf_file")
        return f.resolve()
    return None


def weights_hash(directory: Path) -> str:
    """Content hash of a local checkpoint's weight files, memoised by (path, size, mtime)."""
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    stamp = json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    memo = cache_dir("hashes") / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(embedded.sha256_file(f)))
    digest = "sha256:" + h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so an unreachable hub fails in seconds, not after retries."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _unavailable_message(name: str, error: Exception, hub_down: bool) -> str:
    why = "the hub cannot be reached (offline)" if hub_down else f"loading failed: {str(error).splitlines()[0]}"
    return (
        f"model {name!r} is not available: it is not in the local Hugging Face cache and {why}. "
        f"Download it where the hub is reachable (hf download {name}) or set model.name_or_path to a local directory."
    )
