"""CoreVital: see inside a language model while it generates.

Data flows one way:
    config -> model_loader + prompts -> capture -> trace / table -> sinks
"""

__version__ = "0.1.0"
SCHEMA_VERSION = "1.1.0"  # 1.1.0: contract v2 keys (sample_index, chat_template, ...)
