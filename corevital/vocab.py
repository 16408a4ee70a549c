"""A model's vocabulary as text, decoded once: token texts for the JSON trace and Parquet
come from it by index (one numpy or Arrow take per trace) instead of a tokenizer call per token."""

from __future__ import annotations

import pyarrow as pa

from corevital.jsonrows import Column, strings


class Vocabulary:
    """Every id's text as `tokenizer.decode([id])` gives it (ids past the tokenizer's: "")."""

    def __init__(self, tokenizer, size: int):
        texts = tokenizer.batch_decode([[i] for i in range(max(size, len(tokenizer)))])
        self.json: Column = strings(texts)  # JSON-quoted
        self.arrow: pa.StringArray = pa.array(texts, pa.string())
        self._decode = tokenizer.decode

    def decode(self, ids) -> str:
        """The text of a sequence of ids (not token by token: multi-byte characters join)."""
        return self._decode([int(i) for i in ids])
