"""JSON records from columns of values, with no Python object per value.

A trace holds one JSON object per (step, layer), tens of thousands per trace; building them
as dicts costs about 20 µs each. Here every number array is formatted by one orjson call
(float32 as its shortest round-trip text, NaN and Inf as null), each entry is located by its
delimiters with numpy, and `records` copies literal pieces (keys, braces) and entries into
one byte string: in C (jsonrows.c, compiled at first use like the fused kernels), or, where
no compiler works, by Python list slicing (slower, same bytes).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import numpy as np
import orjson

from corevital import native

NUMPY = orjson.OPT_SERIALIZE_NUMPY
_COMMA, _OPEN, _CLOSE = ord(","), ord("["), ord("]")


@dataclass(frozen=True)
class Column:
    """n JSON texts: entry i is buf[starts[i]:ends[i]]."""

    buf: bytes
    starts: np.ndarray  # (n,) int64
    ends: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, index: np.ndarray) -> "Column":
        """Entries index[0], index[1], ... (e.g. token texts from a vocabulary's column)."""
        return Column(self.buf, self.starts[index], self.ends[index])

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


def numbers(values: np.ndarray) -> Column:
    """values (n,) -> one number each; (n, w) -> one "a,b,...,w" list body each. Float32 as
    its shortest text, NaN and Inf as null, bools as true/false."""
    a = np.ascontiguousarray(values)
    if len(a) == 0:
        return Column(b"", np.zeros(0, np.int64), np.zeros(0, np.int64))
    buf = orjson.dumps(a, option=NUMPY)
    b = np.frombuffer(buf, np.uint8)
    if a.ndim == 1:  # "[x,y,z]"
        commas = np.flatnonzero(b == _COMMA)
        return Column(buf, np.concatenate([[1], commas + 1]), np.concatenate([commas, [len(buf) - 1]]))
    # "[[a,b],[c,d]]": entries between the inner brackets
    return Column(buf, np.flatnonzero(b == _OPEN)[1:] + 1, np.flatnonzero(b == _CLOSE)[:-1])


class Matrix:
    """The numbers of an (n, k) array formatted by one orjson call; `column(j)` is column j's
    entries, `span(a, b)` the entries "x_a,...,x_b-1" (a vector inside a record)."""

    def __init__(self, values: np.ndarray):
        a = np.ascontiguousarray(values)
        n, k = a.shape
        self.buf = orjson.dumps(a, option=NUMPY) if n else b""
        b = np.frombuffer(self.buf, np.uint8)
        # "[[x,y],[z,w]]": without the outer brackets each row is "[", k-1 ",", "]", then "," before the next row
        d = np.flatnonzero((b == _COMMA) | (b == _OPEN) | (b == _CLOSE))[1:-1] if n else np.zeros(0, np.int64)
        d = np.append(d, 0).reshape(n, k + 2)
        self.starts, self.ends = d[:, :k] + 1, d[:, 1:k + 1]  # (n, k) each

    def column(self, j: int) -> Column:
        return Column(self.buf, self.starts[:, j], self.ends[:, j])

    def span(self, a: int, b: int) -> Column:
        return Column(self.buf, self.starts[:, a], self.ends[:, b - 1])


def strings(texts: list[str]) -> Column:
    """Each text as a JSON string (quoted, escaped)."""
    encoded = [orjson.dumps(t) for t in texts]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    return Column(b"".join(encoded), ends - np.array([len(e) for e in encoded], dtype=np.int64), ends)


def pieces(options: list[bytes], which: np.ndarray) -> Column:
    """Entry i is options[which[i]] (separators that differ at group ends, say)."""
    ends = np.cumsum([len(o) for o in options], dtype=np.int64)
    starts = ends - np.array([len(o) for o in options], dtype=np.int64)
    return Column(b"".join(options), starts[which], ends[which])


def record_lengths(literals: list[bytes], columns: list[Column]) -> np.ndarray:
    """Byte length of each record `records` writes."""
    return sum((c.lengths() for c in columns), np.full(len(columns[0]), sum(map(len, literals)), np.int64))


def records(literals: list[bytes], columns: list[Column]) -> bytes:
    """Record i = literals[0] columns[0][i] literals[1] ... columns[-1][i] literals[-1], all
    records concatenated. len(literals) == len(columns) + 1."""
    assert len(literals) == len(columns) + 1 and columns
    n = len(columns[0])
    if n == 0:
        return b""
    lib = _library()
    return _records_c(lib, literals, columns, n) if lib is not None else _records_py(literals, columns, n)


def _records_py(literals: list[bytes], columns: list[Column], n: int) -> bytes:
    stride = 2 * len(columns) + 1
    out: list = [None] * (n * stride)
    for j, lit in enumerate(literals):
        out[2 * j::stride] = [lit] * n
    for j, c in enumerate(columns):
        out[2 * j + 1::stride] = [c.buf[s:e] for s, e in zip(c.starts.tolist(), c.ends.tolist())]
    return b"".join(out)


def _records_c(lib, literals: list[bytes], columns: list[Column], n: int) -> bytes:
    k = len(columns)
    starts = [np.ascontiguousarray(c.starts, dtype=np.int64) for c in columns]
    ends = [np.ascontiguousarray(c.ends, dtype=np.int64) for c in columns]
    size = n * sum(map(len, literals)) + sum(int((e - s).sum()) for s, e in zip(starts, ends))
    out = ctypes.create_string_buffer(size)
    ptrs = ctypes.c_void_p * k
    written = lib.interleave(
        n, k, (ctypes.c_char_p * (k + 1))(*literals), (ctypes.c_int64 * (k + 1))(*map(len, literals)),
        (ctypes.c_char_p * k)(*(c.buf for c in columns)), ptrs(*(s.ctypes.data for s in starts)),
        ptrs(*(e.ctypes.data for e in ends)), out)
    assert written == size
    return out.raw


@cache
def _library():
    lib = native.library("jsonrows.c")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.interleave.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        lib.interleave.restype = i64
    return lib


def available() -> bool:
    """Whether records are copied in C (else by Python list slicing)."""
    return _library() is not None
