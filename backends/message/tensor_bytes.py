"""Tensors <-> bytes for the request channel (wire.py): a flat, self-describing format, so that
a phase reads a request sent over a socket exactly as it reads one sent through Triton (the same
from_tensors checks), and nothing from a peer is ever unpickled.

Per tensor: u8 name length, the name (UTF-8), u8 type code, u32 element count, then the elements:
little-endian values for numbers and booleans, u32 length + bytes for each string. Shapes are not
kept: every tensor between the orchestrator and the phases is one-dimensional (specs.py).
"""

from __future__ import annotations

import struct

import numpy as np

from backends.message.codec import Tensors

_NUMERIC: dict[int, np.dtype] = {
    1: np.dtype("<i4"),
    2: np.dtype("<i8"),
    3: np.dtype("<u8"),
    4: np.dtype("<f4"),
    5: np.dtype("?"),
}
_CODES: dict[np.dtype, int] = {dtype: code for code, dtype in _NUMERIC.items()}
STRINGS = 6
_HEAD = struct.Struct("<BI")  # type code, element count
_LEN = struct.Struct("<I")


class TensorBytesError(ValueError):
    """Bytes that are not tensors in this format."""


def dumps(tensors: Tensors) -> bytes:
    out = bytearray()
    for name, tensor in tensors.items():
        raw_name = name.encode()
        if not 0 < len(raw_name) < 256:
            raise ValueError(f"tensor name {name!r} must be 1-255 bytes")
        flat = np.asarray(tensor).reshape(-1)
        out += bytes([len(raw_name)]) + raw_name
        if flat.dtype == object:
            out += _HEAD.pack(STRINGS, flat.size)
            for value in flat:
                item = value.encode() if isinstance(value, str) else bytes(value)
                out += _LEN.pack(len(item)) + item
            continue
        code = _CODES.get(flat.dtype.newbyteorder("<"))
        if code is None:
            raise ValueError(f"tensor {name!r} has an unsupported type {flat.dtype}")
        out += _HEAD.pack(code, flat.size) + flat.astype(_NUMERIC[code], copy=False).tobytes()
    return bytes(out)


def loads(data: bytes) -> Tensors:
    """The tensors of `data`; TensorBytesError when it is malformed."""
    view = memoryview(data)
    tensors: Tensors = {}
    at = 0
    try:
        while at < len(view):
            n = view[at]
            name = bytes(view[at + 1 : at + 1 + n]).decode()
            at += 1 + n
            code, count = _HEAD.unpack_from(view, at)
            at += _HEAD.size
            if code == STRINGS:
                items = []
                for _ in range(count):
                    (length,) = _LEN.unpack_from(view, at)
                    at += _LEN.size
                    if at + length > len(view):
                        raise TensorBytesError(f"string of tensor {name!r} is cut short")
                    items.append(bytes(view[at : at + length]))
                    at += length
                tensors[name] = np.array(items, dtype=object)
                continue
            dtype = _NUMERIC.get(code)
            if dtype is None:
                raise TensorBytesError(f"tensor {name!r} has an unknown type code {code}")
            size = dtype.itemsize * count
            if at + size > len(view):
                raise TensorBytesError(f"tensor {name!r} is cut short")
            tensors[name] = np.frombuffer(view[at : at + size], dtype=dtype).copy()
            at += size
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise TensorBytesError(f"malformed tensors: {exc}") from exc
    return tensors
