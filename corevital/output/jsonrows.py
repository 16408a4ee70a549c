"""JSON records from columns of values, with no Python object per value.

A trace holds one JSON object per (step, layer), tens of thousands per trace; building them
as dicts costs about 20 µs each. Here each array of numbers is formatted by one orjson call
(float32 as its shortest round-trip text, NaN and Inf as null), and `records` copies literal
pieces (keys, braces) and entries into one byte string, in one pass: in C (jsonrows.c,
compiled at first use like the fused kernels), which reads each orjson text where it left
off; or, where no compiler works, by locating every number with numpy and joining Python
slices (slower, same bytes).

An entry is a `Column` (entry i is a byte range of a buffer: JSON strings, separators) or a
`Take` of `Numbers` (the next numbers of each row of an array, in column order).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import orjson

from corevital.kernels import native

NUMPY = orjson.OPT_SERIALIZE_NUMPY
_COMMA, _OPEN, _CLOSE = ord(","), ord("["), ord("]")
PAD = bytes(32)  # jsonrows.c reads each literal up to 32 bytes past its end


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


class Numbers:
    """The numbers of an (n, k) array, formatted by one orjson call: float32 as its shortest
    text, NaN and Inf as null, integers as integers. A template uses them through `take`, in
    column order: each take is the next `width` numbers of every row ("x,y,z"), and the
    takes of one template cover all k columns."""

    def __init__(self, values: np.ndarray):
        a = np.ascontiguousarray(values)
        if a.ndim != 2:
            raise ValueError(f"Numbers takes an (n, k) array, not shape {a.shape}")
        self.n, self.k = a.shape
        self.buf = orjson.dumps(a, option=NUMPY) if self.n and self.k else b""
        self.taken = 0

    def take(self, width: int = 1) -> "Take":
        if width < 1 or self.taken + width > self.k:
            raise ValueError(f"cannot take {width} more of {self.k - self.taken} columns left")
        t = Take(self, self.taken, width)
        self.taken += width
        return t

    def text_bytes(self) -> int:
        """The bytes of all the numbers' texts: `buf` less its n * k + 2n + 1 brackets and commas."""
        return len(self.buf) - (self.n * self.k + 2 * self.n + 1) if self.buf else 0

    @cached_property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends), each (n, k): where every number lies in `buf` (the fallback's way)."""
        if not self.n or not self.k:
            return np.zeros((self.n, self.k), np.int64), np.zeros((self.n, self.k), np.int64)
        b = np.frombuffer(self.buf, np.uint8)
        # "[[x,y],[z,w]]": without the outer brackets each row is "[", k-1 ",", "]", then "," before the next row
        d = np.flatnonzero((b == _COMMA) | (b == _OPEN) | (b == _CLOSE))[1:-1]
        d = np.append(d, 0).reshape(self.n, self.k + 2)
        return d[:, : self.k] + 1, d[:, 1 : self.k + 1]


@dataclass(frozen=True)
class Take:
    """Columns first .. first + width - 1 of `numbers`, each row's as "x,y,z"."""

    numbers: Numbers
    first: int
    width: int

    def __len__(self) -> int:
        return self.numbers.n

    def column(self) -> Column:
        starts, ends = self.numbers.bounds
        return Column(self.numbers.buf, starts[:, self.first], ends[:, self.first + self.width - 1])


def strings(texts: list[str]) -> Column:
    """Each text as a JSON string (quoted, escaped). Appended one at a time: each orjson result
    sits in an allocation of a few KiB, so a vocabulary's 49k of them alive at once would
    hold about 200 MiB."""
    body, ends = bytearray(), np.empty(len(texts), np.int64)
    for i, t in enumerate(texts):
        body += orjson.dumps(t)
        ends[i] = len(body)
    return Column(bytes(body), ends - np.diff(ends, prepend=0), ends)


def pieces(options: list[bytes], which: np.ndarray) -> Column:
    """Entry i is options[which[i]] (separators that differ at group ends, say)."""
    ends = np.cumsum([len(o) for o in options], dtype=np.int64)
    starts = ends - np.array([len(o) for o in options], dtype=np.int64)
    return Column(b"".join(options), starts[which], ends[which])


def records(literals: list[bytes], entries: list[Column | Take], prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """prefix, then record i = literals[0] entries[0][i] literals[1] ... entries[-1][i] literals[-1]
    for every i, then suffix, as one byte string; len(literals) == len(entries) + 1."""
    return _records(literals, entries, prefix, suffix, with_ends=False)[0]


def record_column(literals: list[bytes], entries: list[Column | Take]) -> Column:
    """The records of `records` as a Column (entry i is record i), to place inside other records."""
    body, ends = _records(literals, entries, b"", b"", with_ends=True)
    return Column(body, np.concatenate([np.zeros(1, np.int64), ends])[:-1], ends)


def _records(literals, entries, prefix, suffix, with_ends):
    assert len(literals) == len(entries) + 1 and entries
    n = len(entries[0])
    _check(entries, n)
    lib = _library()
    return (
        _records_c(lib, literals, entries, n, prefix, suffix, with_ends)
        if lib is not None
        else _records_py(literals, entries, n, prefix, suffix, with_ends)
    )


def _check(entries: list[Column | Take], n: int) -> None:
    """Every entry has n rows, and the takes of each Numbers cover its columns in order."""
    if any(len(e) != n for e in entries):
        raise ValueError(f"entries of different lengths: {sorted({len(e) for e in entries})}")
    seen: dict[int, int] = {}
    for e in entries:
        if isinstance(e, Take):
            at = seen.get(id(e.numbers), 0)
            if e.first != at:
                raise ValueError(f"a template takes column {e.first} of its numbers where column {at} is next")
            seen[id(e.numbers)] = at + e.width
    for e in entries:
        if isinstance(e, Take) and seen[id(e.numbers)] != e.numbers.k:
            raise ValueError(f"a template takes {seen[id(e.numbers)]} of its numbers' {e.numbers.k} columns")


def _records_py(literals, entries, n, prefix, suffix, with_ends):
    columns = [e.column() if isinstance(e, Take) else e for e in entries]
    stride = 2 * len(columns) + 1
    out: list = [None] * (n * stride)
    for j, lit in enumerate(literals):
        out[2 * j :: stride] = [lit] * n
    for j, c in enumerate(columns):
        out[2 * j + 1 :: stride] = [c.buf[s:e] for s, e in zip(c.starts.tolist(), c.ends.tolist())]
    ends = None
    if with_ends:
        lengths = sum((c.lengths() for c in columns), np.full(n, sum(map(len, literals)), np.int64))
        ends = np.cumsum(lengths)
    return prefix + b"".join(out) + suffix, ends


def _records_c(lib, literals, entries, n, prefix, suffix, with_ends):
    k = len(entries)
    if n == 0:
        return prefix + suffix, np.zeros(0, np.int64)
    streams = list({id(e.numbers): e.numbers for e in entries if isinstance(e, Take)}.values())
    which = {id(s): i for i, s in enumerate(streams)}
    indexed = [
        (np.ascontiguousarray(e.starts, np.int64), np.ascontiguousarray(e.ends, np.int64))
        if isinstance(e, Column)
        else None
        for e in entries
    ]
    size = (
        len(prefix)
        + len(suffix)
        + n * sum(map(len, literals))
        + sum(s.text_bytes() for s in streams)
        + sum(n * (e.width - 1) for e in entries if isinstance(e, Take))  # the "," inside vectors
        + sum(int((e - s).sum()) for s, e in filter(None, indexed))
    )
    out = _new_bytes(None, size)  # filled below, before anything else sees it: no zeroing, no copy
    at = _bytes_address(out)
    ctypes.memmove(at, prefix, len(prefix))
    record_ends = np.empty(n, np.int64) if with_ends else None
    ptrs = ctypes.c_void_p * k
    bufs = [e.numbers.buf if isinstance(e, Take) else e.buf for e in entries]
    written = lib.interleave(
        n,
        k,
        (ctypes.c_char_p * (k + 1))(*(lit + PAD for lit in literals)),
        (ctypes.c_int64 * (k + 1))(*map(len, literals)),
        (ctypes.c_char_p * k)(*bufs),
        (ctypes.c_int64 * k)(*map(len, bufs)),
        ptrs(*(ix[0].ctypes.data if ix else None for ix in indexed)),
        ptrs(*(ix[1].ctypes.data if ix else None for ix in indexed)),
        (ctypes.c_int64 * k)(*(e.width if isinstance(e, Take) else 0 for e in entries)),
        (ctypes.c_int64 * k)(*(which[id(e.numbers)] if isinstance(e, Take) else 0 for e in entries)),
        (ctypes.c_int64 * max(len(streams), 1))(),
        at + len(prefix),
        size - len(prefix),
        None if record_ends is None else record_ends.ctypes.data,
    )
    if len(prefix) + written + len(suffix) != size:
        raise AssertionError(
            f"jsonrows: {written} bytes of records where {size - len(prefix) - len(suffix)} were counted"
        )
    ctypes.memmove(at + len(prefix) + written, suffix, len(suffix))
    return out, record_ends


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize  # CPython's way to build a bytes object in place
_new_bytes.argtypes, _new_bytes.restype = [ctypes.c_void_p, ctypes.c_ssize_t], ctypes.py_object
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.argtypes, _bytes_address.restype = [ctypes.py_object], ctypes.c_void_p


@cache
def _library():
    lib = native.library(Path(__file__).with_name("jsonrows.c"))
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.interleave.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
        lib.interleave.restype = i64
    return lib


def available() -> bool:
    """Whether records are copied in C (else by Python list slicing)."""
    return _library() is not None
