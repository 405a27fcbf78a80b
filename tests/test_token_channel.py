"""The token channel from prefill and decode to the orchestrator: frames, and both ends over real
sockets.

The end-to-end proof (a real tritonserver streaming through it, a killed decode process) is in
tests/test_e2e_serving.py and tests/test_e2e_faults.py; these check the pieces on their own."""

from __future__ import annotations

import queue
import secrets
import socket
import time

import pytest

from backends.common.channel import Channels
from backends.message import DecodeChunk, InbandError, PrefillResult, wire
from backends.orchestrator.inbox import Item, TokenInbox
from engine.errors import RequestError


def test_frames_round_trip() -> None:
    sid = wire.stream_id("ab" * 16)
    for message in (
        DecodeChunk(output_ids=(1, 2, 70000)),
        DecodeChunk(finish_reason="stop"),
        DecodeChunk(),
        DecodeChunk(output_ids=(3, 4), output_log_probs=(-0.5, -2.25), finish_reason="length"),
        DecodeChunk(output_ids=(5,), finish_reason="length", last_token_time_ns=2**62 + 1, kv_blocks=9),
        DecodeChunk(
            output_ids=(6,), output_log_probs=(-1.0,), finish_reason="stop", last_token_time_ns=3, kv_blocks=1
        ),
    ):
        data = wire.chunk(sid, message)
        length, kind, got_sid = wire.HEADER.unpack(data[: wire.HEADER.size])
        assert (length, got_sid) == (len(data) - 4, sid)
        assert wire.parse(kind, data[wire.HEADER.size :]) == message
    data = wire.error(sid, InbandError(error_message="KV pull failed"))
    assert wire.parse(wire.ERROR, data[wire.HEADER.size :]) == InbandError(error_message="KV pull failed")
    assert wire.parse(wire.HELLO, wire.hello("decode_1")[wire.HEADER.size :]) == "decode_1"
    for result in (
        PrefillResult(first_token=42, kv_handle=b'{"shards": []}'),
        PrefillResult(first_token=2, finish_reason="stop"),
        PrefillResult(first_token=3, kv_handle=b"h", first_log_prob=-1.5),
        PrefillResult(
            first_token=4,
            kv_handle=b"h",
            first_scheduled_time_ns=2**62,
            first_token_time_ns=2**62 + 7,
            kv_blocks=3,
        ),
    ):
        data = wire.encode(sid, result)
        assert wire.parse(wire.RESULT, data[wire.HEADER.size :]) == result


@pytest.mark.parametrize(
    "kind, payload, message",
    [
        (9, b"", "unknown frame kind"),
        (wire.CHUNK, b"\x05", "malformed"),
        (wire.CHUNK, b"\x00\x00\x00abc", "4-byte values"),
        (wire.CHUNK, b"\x00\x00\x01abcd", "4-byte values"),  # an id without its log-probability
        (wire.CHUNK, b"\x05\x00ab", "cut short"),
        (wire.RESULT, b"\x01\x00", "malformed"),
        (wire.RESULT, wire.RESULT_HEAD.pack(1, 0, 0.0, 0, 0, 0, 9) + b"ab", "cut short"),
        (wire.CHUNK, b"\x00\x00\x02abc", "malformed"),  # end stats announced, not there
    ],
)
def test_malformed_frames_are_refused(kind: int, payload: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.parse(kind, payload)


def test_stream_ids_are_the_request_ids_hex() -> None:
    with pytest.raises(wire.WireError, match="32 hex digits"):
        wire.stream_id("not-hex")
    with pytest.raises(RequestError, match="32 hex digits"):
        Channels("decode").sink(wire.ABSTRACT_PREFIX + "x", "abc")


def items(q: queue.SimpleQueue[Item], n: int, timeout_s: float = 5.0) -> list[Item]:
    return [q.get(timeout=timeout_s) for _ in range(n)]


def test_chunks_reach_their_request_in_order() -> None:
    inbox = TokenInbox()
    channels = Channels("decode")
    try:
        a, b = secrets.token_hex(16), secrets.token_hex(16)
        qa, qb = inbox.open(a, "decode"), inbox.open(b, "decode")
        sa, sb = channels.sink(inbox.reply_to, a), channels.sink(inbox.reply_to, b)
        sa.send(DecodeChunk(output_ids=(5,)), final=False)
        sb.send(DecodeChunk(), final=False)  # a heartbeat
        sa.send(DecodeChunk(output_ids=(6, 7), finish_reason="length"), final=True)
        sa.send(DecodeChunk(output_ids=(8,)), final=False)  # after the final one: dropped
        sb.error("could not pull the KV cache")
        assert items(qa, 2) == [
            ("chunk", DecodeChunk(output_ids=(5,))),
            ("chunk", DecodeChunk(output_ids=(6, 7), finish_reason="length")),
        ]
        assert items(qb, 2) == [("chunk", DecodeChunk()), ("error", "could not pull the KV cache")]
        time.sleep(0.2)
        assert qa.empty() and not sa.is_cancelled()
    finally:
        channels.close()
        inbox.close()


def test_a_lost_decode_connection_fails_its_requests_at_once() -> None:
    inbox = TokenInbox()
    one, two = Channels("decode_0"), Channels("decode_1")
    try:
        a, b = secrets.token_hex(16), secrets.token_hex(16)
        qa, qb = inbox.open(a, "decode_0"), inbox.open(b, "decode_1")
        one.sink(inbox.reply_to, a).send(DecodeChunk(output_ids=(1,)), final=False)
        two.sink(inbox.reply_to, b).send(DecodeChunk(output_ids=(2,)), final=False)
        assert items(qa, 1) == [("chunk", DecodeChunk(output_ids=(1,)))]
        assert items(qb, 1) == [("chunk", DecodeChunk(output_ids=(2,)))]
        t0 = time.monotonic()
        one.close()  # decode_0's process died: its socket closes
        kind, text = qa.get(timeout=5)
        assert kind == "lost" and "decode_0" in str(text) and time.monotonic() - t0 < 1
        time.sleep(0.2)
        assert qb.empty()  # decode_1's requests go on
    finally:
        two.close()
        inbox.close()


def test_a_request_moves_from_its_prefill_to_its_decode_instance() -> None:
    """One request id: the result from prefill's connection, then tokens from decode's; a prefill
    instance that dies afterwards does not touch the request any more."""
    inbox = TokenInbox()
    prefill, decode = Channels("prefill"), Channels("decode")
    try:
        rid = secrets.token_hex(16)
        q = inbox.open(rid, "prefill")
        prefill.sink(inbox.reply_to, rid).send(PrefillResult(first_token=7, kv_handle=b"h"), final=True)
        assert items(q, 1) == [("result", PrefillResult(first_token=7, kv_handle=b"h"))]
        assert inbox.open(rid, "decode") is q
        prefill.close()
        decode.sink(inbox.reply_to, rid).send(
            DecodeChunk(output_ids=(8,), finish_reason="length"), final=True
        )
        assert items(q, 1) == [("chunk", DecodeChunk(output_ids=(8,), finish_reason="length"))]
        time.sleep(0.2)
        assert q.empty()
    finally:
        decode.close()
        inbox.close()


def test_a_lost_prefill_connection_fails_the_requests_waiting_for_it() -> None:
    inbox = TokenInbox()
    prefill = Channels("prefill")
    try:
        rid = secrets.token_hex(16)
        q = inbox.open(rid, "prefill")
        prefill.sink(inbox.reply_to, rid)  # accepted, not yet prefilled
        time.sleep(0.1)  # the connection's HELLO has been read
        prefill.close()
        kind, text = q.get(timeout=5)
        assert kind == "lost" and "'prefill'" in str(text)
    finally:
        inbox.close()


def test_a_gone_orchestrator_cancels_the_requests_sent_to_it() -> None:
    inbox = TokenInbox()
    channels = Channels("decode")
    rid = secrets.token_hex(16)
    inbox.open(rid, "decode")
    sink = channels.sink(inbox.reply_to, rid)
    inbox.close()
    # The next write (a token or the once-a-second heartbeat) finds the connection gone.
    deadline = time.monotonic() + 5
    while not sink.is_cancelled() and time.monotonic() < deadline:
        sink.send(DecodeChunk(), final=False)
        time.sleep(0.05)
    assert sink.is_cancelled()
    channels.close()


def test_an_unreachable_channel_is_a_clear_request_error() -> None:
    with pytest.raises(RequestError, match="cannot reach the orchestrator's token channel"):
        Channels("decode").sink(
            wire.ABSTRACT_PREFIX + "nobody-" + secrets.token_hex(4), secrets.token_hex(16)
        )
    with pytest.raises(RequestError, match="unsupported reply_to"):
        Channels("decode").sink("tcp://10.0.0.1:9", secrets.token_hex(16))


def test_a_malformed_frame_closes_only_that_connection() -> None:
    inbox = TokenInbox()
    channels = Channels("decode_ok")
    try:
        a, b = secrets.token_hex(16), secrets.token_hex(16)
        qa, qb = inbox.open(a, "decode_bad"), inbox.open(b, "decode_ok")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect("\0" + inbox.name)
        raw.sendall(wire.hello("decode_bad") + wire.frame(9, wire.stream_id(a), b""))
        kind, text = qa.get(timeout=5)
        assert kind == "lost" and "malformed" in str(text)
        channels.sink(inbox.reply_to, b).send(DecodeChunk(output_ids=(3,)), final=True)
        assert items(qb, 1) == [("chunk", DecodeChunk(output_ids=(3,)))]
        raw.close()
    finally:
        channels.close()
        inbox.close()
