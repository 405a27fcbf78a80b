"""Typed messages <-> Triton tensors, derived from the tensor specs.

A message is a frozen dataclass whose fields are named after tensors of one model's interface
(specs.py). `to_tensors()` writes each field that is not None as the tensor its spec describes;
`from_tensors()` reads them back, checking shape and type, and raises RequestError naming the
input and the problem. A field without a default is a required tensor; one with a default is
optional (absent: the default). A field typed tuple is a sequence (dims (-1,)), any other field one
value (dims (1,), or a one-element (-1,) tensor such as text_output).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from backends.message.specs import TensorSpec
from engine.errors import RequestError

Tensors = dict[str, np.ndarray]
M = TypeVar("M", bound="Message")
C = TypeVar("C", bound="StreamChunk")

_NUMPY_TYPES: dict[str, type] = {
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_UINT64": np.uint64,
    "TYPE_FP32": np.float32,
    "TYPE_BOOL": np.bool_,
    "TYPE_STRING": np.object_,
}


class _Field(NamedTuple):
    spec: TensorSpec
    required: bool
    many: bool  # a sequence (typed tuple), else one value
    raw_bytes: bool  # a STRING field typed `bytes` (kept as bytes, not decoded as UTF-8)


class Message:
    """Base of every message between the client, the orchestrator and the phases.

    Subclasses are `@dataclass(frozen=True, kw_only=True)` and set SPECS to the specs of their
    fields (every field needs a spec of its name)."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = ()

    def to_tensors(self) -> Tensors:
        out: Tensors = {}
        for f in _fields(type(self)):
            value = getattr(self, f.spec.name)
            if value is not None:
                out[f.spec.name] = encode(f.spec, value, f.many)
        return out

    @classmethod
    def from_tensors(cls: type[M], tensors: Mapping[str, np.ndarray]) -> M:
        values: dict[str, Any] = {}
        for f in _fields(cls):
            name = f.spec.name
            if name in tensors:
                values[name] = decode(f.spec, tensors[name], f.many, f.raw_bytes)
            elif f.required:
                raise RequestError(f"missing required input '{name}'")
        return cls(**values)


_LAYOUTS: dict[type, tuple[_Field, ...]] = {}


def _fields(cls: type[Message]) -> tuple[_Field, ...]:
    """The fields of a message class with their specs (worked out once per class)."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        layout = _LAYOUTS[cls] = _layout(cls)
    return layout


def _layout(cls: type[Message]) -> tuple[_Field, ...]:
    specs = {s.name: s for s in cls.SPECS}
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in specs:
            raise TypeError(f"{cls.__name__}.{f.name} has no tensor spec")
        spec, hint = specs[f.name], str(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        many = hint.startswith("tuple")
        if many and spec.dims != (-1,):
            raise TypeError(f"{cls.__name__}.{f.name} is a sequence but its tensor has dims {spec.dims}")
        fields.append(_Field(spec, required, many, "bytes" in hint))
    return tuple(fields)


def encode(spec: TensorSpec, value: Any, many: bool = False) -> np.ndarray:
    """One field (a sequence if `many`) as the tensor `spec` describes."""
    dtype = _NUMPY_TYPES[spec.data_type]
    items = list(value) if many else [value]
    if spec.data_type == "TYPE_STRING":
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in items]
    return np.asarray(items, dtype=dtype)


def decode(spec: TensorSpec, tensor: np.ndarray, many: bool = False, raw_bytes: bool = False) -> Any:
    """One tensor as a field value (a tuple if `many`); RequestError names the input and what is
    wrong with it."""
    arr = np.asarray(tensor)
    name, kind = spec.name, spec.data_type
    if not many:
        if arr.size != 1:
            what = "string" if kind == "TYPE_STRING" else "value"
            raise RequestError(f"input '{name}' must hold exactly one {what}, got shape {list(arr.shape)}")
        return _scalar(name, kind, arr, raw_bytes)
    if kind == "TYPE_STRING":
        return tuple(_text(v, name) for v in np.asarray(arr, dtype=object).reshape(-1))
    if kind == "TYPE_FP32":
        if not np.issubdtype(arr.dtype, np.number):
            raise RequestError(f"input '{name}' must be numbers, got {arr.dtype}")
        return tuple(float(v) for v in arr.reshape(-1))
    if not np.issubdtype(arr.dtype, np.integer):
        raise RequestError(f"input '{name}' must be integer token ids, got {arr.dtype}")
    return tuple(int(t) for t in arr.reshape(-1))


def _scalar(name: str, kind: str, arr: np.ndarray, raw_bytes: bool) -> Any:
    value = arr.reshape(-1)[0]
    if kind == "TYPE_STRING":
        return bytes(value) if raw_bytes else _text(value, name)
    if kind == "TYPE_BOOL":
        return bool(value)
    if kind in ("TYPE_INT32", "TYPE_INT64", "TYPE_UINT64"):
        if not np.issubdtype(arr.dtype, np.integer):
            raise RequestError(f"input '{name}' must be an integer, got {arr.dtype}")
        return int(value)
    if not np.issubdtype(arr.dtype, np.number):
        raise RequestError(f"input '{name}' must be a number, got {arr.dtype}")
    return float(value)


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"input '{name}' is not valid UTF-8: {e}") from None
    raise RequestError(f"input '{name}' must be a string, got {type(value).__name__}")


def specs_named(specs: tuple[TensorSpec, ...], *names: str) -> tuple[TensorSpec, ...]:
    """The specs of `names`, in that order (a message's share of a model's interface)."""
    by_name = {s.name: s for s in specs}
    return tuple(by_name[n] for n in names)


class StreamChunk(Message):
    """A streamed response that can absorb the next response of its stream (an outbox merges
    the responses that queue up behind a slow send)."""

    def merge(self: C, later: C) -> C:
        raise NotImplementedError
