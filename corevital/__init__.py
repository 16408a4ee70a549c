"""CoreVital: see inside a language model while it generates.

The public Python API (docs/api.md), imported on first use so that `import corevital` stays light:

    record(model, tokenizer)   capture around any `model.generate` call (a context manager)
    Recording                  what it captured: to_pandas(), traces(), save(dir)
    load_sweep(path, ...)      the Parquet tables of a job or a sweep, as one DataFrame
    evaluate(path)             grade every trace and rank the signals: (labels, signals)
    UnsupportedModel           raised when capture cannot reproduce a model's values exactly
"""

__version__ = "0.1.0"
SCHEMA_VERSION = "1.1.0"  # 1.1.0: sample_index, chat_template, the v2 metrics, ... (docs/format.md)

_PUBLIC = {  # name -> the module that holds it
    "record": "corevital.api",
    "Recording": "corevital.api",
    "RecordError": "corevital.api",
    "load_sweep": "corevital.analysis",
    "evaluate": "corevital.analysis",
    "UnsupportedModel": "corevital.capture.support",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'corevital' has no attribute {name!r}")
