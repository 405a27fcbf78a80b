"""The channels' frames between the orchestrator and the phases, over local sockets, without Triton.

Requests go orchestrator -> prefill/decode over the phase's request channel (its "door", named
after the server and the model: door_name); results and tokens come back over the orchestrator's
token channel, named in each request's `reply_to`. Neither crosses the server (docs/overhead.md).

A PrefillRequest or DecodeRequest that names a `reply_to` channel has its result or tokens, its
end and its errors sent over that channel as frames (one sent as a BLS call is answered on the call
only with one final, empty response: "accepted").

Frame: u32 length of the rest | u8 kind | 16-byte stream id (the request_id's hex) | payload.
- HELLO: payload = the sender's model name (UTF-8); stream id zero. First frame of a connection.
- CHUNK: a DecodeChunk: u16 length + finish_reason (UTF-8), u8 flags (bit 0: log-probabilities
  follow the ids; bit 1: the end stats follow the flags: i64 last_token_time_ns, i32 kv_blocks),
  the token ids as little-endian int32, then (if so) one little-endian float32 log-probability
  per id. A chunk with no ids and no finish_reason is a heartbeat.
- ERROR: an InbandError: payload = the message (UTF-8).
- RESULT: a PrefillResult: i32 first token, u8 1 if the f32 that follows is its
  log-probability (else 0), i64 first_scheduled_time_ns, i64 first_token_time_ns, i32 kv_blocks,
  u16 length + finish_reason (UTF-8), then the KV handle's bytes.
- REQUEST (orchestrator -> door): a PrefillRequest, DecodeRequest or DecodeCancel as its tensors
  (tensor_bytes.py); the stream id is its request_id's.
Only these five kinds exist; anything else, or a frame over MAX_FRAME, is a protocol error.
"""

from __future__ import annotations

import os
import socket
import struct

import numpy as np

from backends.message import tensor_bytes
from backends.message.codec import Tensors
from backends.message.phases import DecodeChunk, InbandError, PrefillResult

HELLO, CHUNK, ERROR, RESULT, REQUEST = 1, 2, 3, 4, 5
HEADER = struct.Struct("<IB16s")  # length after the u32, kind, stream id
RESULT_HEAD = struct.Struct("<iBfqqiH")
END_STATS = struct.Struct("<qi")
LOG_PROBS, HAS_END_STATS = 1, 2  # a chunk's flags
MAX_FRAME = 1 << 24
NO_STREAM = bytes(16)
# The reply_to of a channel on Linux's abstract socket namespace: nothing on the file system.
ABSTRACT_PREFIX = "unix-abstract:"


class WireError(ValueError):
    """A malformed frame: the connection carrying it is closed."""


def door_name(model: str) -> str:
    """The abstract socket name of `model`'s request channel. Triton starts every python-backend
    stub as its own child, so the server's pid (the stub's parent) tells this server's doors from
    another's on the same host."""
    return f"disagg-door-{os.getppid()}-{model}"


def stream_id(request_id: str) -> bytes:
    """The 16 bytes of a request_id of 32 hex digits (as the orchestrator makes them)."""
    try:
        raw = bytes.fromhex(request_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise WireError(f"a channel stream needs a request_id of 32 hex digits, got {request_id!r}")
    return raw


def frame(kind: int, sid: bytes, payload: bytes) -> bytes:
    return HEADER.pack(1 + 16 + len(payload), kind, sid) + payload


def hello(model: str) -> bytes:
    return frame(HELLO, NO_STREAM, model.encode())


def chunk(sid: bytes, c: DecodeChunk) -> bytes:
    reason = c.finish_reason.encode()
    ids = np.asarray(c.output_ids, dtype="<i4").tobytes()
    has_log_probs = bool(c.output_log_probs)
    if has_log_probs and len(c.output_log_probs) != len(c.output_ids):
        raise ValueError(f"{len(c.output_ids)} ids with {len(c.output_log_probs)} log-probabilities")
    log_probs = np.asarray(c.output_log_probs, dtype="<f4").tobytes()
    end = b""
    if c.last_token_time_ns is not None and c.kv_blocks is not None:
        end = END_STATS.pack(c.last_token_time_ns, c.kv_blocks)
    flags = (LOG_PROBS if has_log_probs else 0) | (HAS_END_STATS if end else 0)
    return frame(
        CHUNK, sid, struct.pack("<H", len(reason)) + reason + struct.pack("<B", flags) + end + ids + log_probs
    )


def error(sid: bytes, e: InbandError) -> bytes:
    return frame(ERROR, sid, e.error_message.encode())


def result(sid: bytes, r: PrefillResult) -> bytes:
    reason = r.finish_reason.encode()
    log_prob = 0.0 if r.first_log_prob is None else r.first_log_prob
    head = RESULT_HEAD.pack(
        r.first_token,
        r.first_log_prob is not None,
        log_prob,
        r.first_scheduled_time_ns,
        r.first_token_time_ns,
        r.kv_blocks,
        len(reason),
    )
    return frame(RESULT, sid, head + reason + r.kv_handle)


def request(sid: bytes, tensors: Tensors) -> bytes:
    return frame(REQUEST, sid, tensor_bytes.dumps(tensors))


def parse_request(kind: int, payload: bytes) -> Tensors:
    """A REQUEST frame's tensors; WireError for any other kind or a malformed payload."""
    if kind != REQUEST:
        raise WireError(f"a request channel got a frame of kind {kind}")
    try:
        return tensor_bytes.loads(payload)
    except tensor_bytes.TensorBytesError as exc:
        raise WireError(str(exc)) from exc


class FrameReader:
    """Reads frames from a connection through a buffer: the frames one write carried (decode
    writes a step's tokens at once) come out of one recv()."""

    def __init__(self, conn: socket.socket, chunk: int = 1 << 16) -> None:
        self._conn = conn
        self._chunk = chunk
        self._buf = bytearray()

    def frame(self) -> tuple[int, bytes, bytes]:
        """The next frame: kind, stream id, payload. ConnectionError (an OSError) when the peer
        closes the connection, WireError when the length is out of range."""
        while (got := self._parse()) is None:
            data = self._conn.recv(self._chunk)
            if not data:
                raise ConnectionError(
                    f"peer closed the connection with {len(self._buf)} bytes of a frame read"
                )
            self._buf += data
        return got

    def ready(self) -> list[tuple[int, bytes, bytes]]:
        """The frames that have arrived in full by now, without waiting for more."""
        while True:
            try:
                data = self._conn.recv(self._chunk, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not data:
                break  # closed: the next frame() says so
            self._buf += data
        out = []
        while (got := self._parse()) is not None:
            out.append(got)
        return out

    def _parse(self) -> tuple[int, bytes, bytes] | None:
        """The first frame of the buffer, taken out of it, if it is all there."""
        if len(self._buf) < HEADER.size:
            return None
        length, kind, sid = HEADER.unpack_from(self._buf)
        if not 17 <= length <= MAX_FRAME:
            raise WireError(f"frame length {length} out of range")
        end = 4 + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return kind, sid, payload


def encode(sid: bytes, message: DecodeChunk | PrefillResult | InbandError) -> bytes:
    """The frame of a request's message."""
    if isinstance(message, DecodeChunk):
        return chunk(sid, message)
    if isinstance(message, PrefillResult):
        return result(sid, message)
    return error(sid, message)


def parse(kind: int, payload: bytes) -> DecodeChunk | PrefillResult | InbandError | str:
    """A frame's message (HELLO: the model name); WireError when it is malformed."""
    try:
        if kind == HELLO:
            return payload.decode()
        if kind == ERROR:
            return InbandError(error_message=payload.decode())
        if kind == CHUNK:
            (n,) = struct.unpack_from("<H", payload)
            if len(payload) < 3 + n:
                raise WireError("a chunk's finish_reason is cut short")
            reason = payload[2 : 2 + n].decode()
            flags = payload[2 + n]
            rest = payload[3 + n :]
            last_token_time_ns = kv_blocks = None
            if flags & HAS_END_STATS:
                last_token_time_ns, kv_blocks = END_STATS.unpack_from(rest)
                rest = rest[END_STATS.size :]
            width = 8 if flags & LOG_PROBS else 4
            if len(rest) % width:
                raise WireError("a chunk's token ids (and log-probabilities) are not whole 4-byte values")
            count = len(rest) // width
            ids = tuple(int(t) for t in np.frombuffer(rest[: 4 * count], dtype="<i4"))
            log_probs = tuple(float(x) for x in np.frombuffer(rest[4 * count :], dtype="<f4"))
            return DecodeChunk(
                output_ids=ids,
                finish_reason=reason,
                output_log_probs=log_probs,
                last_token_time_ns=last_token_time_ns,
                kv_blocks=kv_blocks,
            )
        if kind == RESULT:
            first, has_log_prob, log_prob, scheduled, first_at, blocks, n = RESULT_HEAD.unpack_from(payload)
            start = RESULT_HEAD.size
            if len(payload) < start + n:
                raise WireError("a result's finish_reason is cut short")
            reason = payload[start : start + n].decode()
            return PrefillResult(
                first_token=first,
                finish_reason=reason,
                kv_handle=payload[start + n :],
                first_log_prob=log_prob if has_log_prob else None,
                first_scheduled_time_ns=scheduled,
                first_token_time_ns=first_at,
                kv_blocks=blocks,
            )
    except (struct.error, UnicodeDecodeError) as exc:
        raise WireError(f"malformed frame of kind {kind}: {exc}") from exc
    raise WireError(f"unknown frame kind {kind}")
