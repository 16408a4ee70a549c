"""A model's vocabulary as text, decoded once: token texts for the JSON trace and Parquet
come from it by index (one numpy or Arrow take per trace) instead of a tokenizer call per token."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from corevital.output.jsonrows import Column, strings


class Vocabulary:
    """Every id's text as `tokenizer.decode([id])` gives it (ids past the tokenizer's: "")."""

    def __init__(self, tokenizer, size: int):
        texts = tokenizer.batch_decode([[i] for i in range(max(size, len(tokenizer)))])
        self.json: Column = strings(texts)  # JSON-quoted
        self.arrow: pa.StringArray = _string_array(texts)
        self._decode = tokenizer.decode

    def decode(self, ids) -> str:
        """The text of a sequence of ids (not token by token: multi-byte characters join)."""
        return self._decode([int(i) for i in ids])


def _string_array(texts: list[str]) -> pa.StringArray:
    """`pa.array(texts, pa.string())` from its buffers: pa.array on a Python list imports
    pandas (to look for its types), about 0.4 s of a job's start on a 2-core CPU."""
    data = [t.encode() for t in texts]
    offsets = np.zeros(len(data) + 1, np.int32)  # pa.string(): 32-bit offsets into one buffer
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(b"".join(data)))
