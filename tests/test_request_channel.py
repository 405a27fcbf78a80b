"""The request channel (orchestrator -> prefill/decode without the server): its tensor encoding,
a phase's door, the orchestrator's connections to doors, and the token channel's corked writes.
The real path through tritonserver is covered by the e2e and fault tests."""

from __future__ import annotations

import queue
import secrets
import socket
import threading
import time

import numpy as np
import pytest

from backends.common.channel import Channels
from backends.common.door import Door
from backends.message import DecodeCancel, DecodeChunk, DecodeRequest, PrefillRequest, Tensors, wire
from backends.message import tensor_bytes as tb
from backends.message.phases import read_decode_input
from backends.orchestrator.doors import DoorError, Doors
from backends.orchestrator.inbox import TokenInbox


def rid() -> str:
    return secrets.token_hex(16)


def model() -> str:
    return "prefill-" + secrets.token_hex(4)  # doors are per server (pid) and model: keep tests apart


PREFILL = PrefillRequest(
    input_ids=(1, 2, 3),
    max_tokens=7,
    temperature=0.5,
    random_seed=2**63 + 5,
    return_log_probs=True,
    bad_word_ids=(4, 5),
    bad_word_lens=(2,),
    request_id="ab" * 16,
    reply_to=wire.ABSTRACT_PREFIX + "somewhere",
)


@pytest.mark.parametrize(
    "message",
    [
        PREFILL,
        DecodeRequest(
            input_ids=(9,), first_token=3, kv_handle=b"\x00\xffhandle", max_tokens=2, request_id="cd" * 16
        ),
        DecodeCancel(request_id="ef" * 16),
    ],
)
def test_messages_cross_the_request_channel_unchanged(
    message: PrefillRequest | DecodeRequest | DecodeCancel,
) -> None:
    tensors = tb.loads(tb.dumps(message.to_tensors()))
    if isinstance(message, PrefillRequest):
        assert PrefillRequest.from_tensors(tensors) == message
    else:
        assert read_decode_input(tensors) == message


@pytest.mark.parametrize(
    "data, message",
    [
        (tb.dumps({"a": np.array([1, 2], np.int32)})[:-1], "cut short"),
        (bytes([1]) + b"a" + bytes([9]) + (1).to_bytes(4, "little"), "unknown type code 9"),
        (
            bytes([1]) + b"a" + bytes([6]) + (1).to_bytes(4, "little") + (50).to_bytes(4, "little"),
            "cut short",
        ),
        (bytes([5]) + b"ab", "malformed"),
    ],
)
def test_malformed_tensor_bytes_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(tb.TensorBytesError, match=message):
        tb.loads(data)


def test_types_outside_the_messages_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported type"):
        tb.dumps({"x": np.array([1.0], np.float64)})


class Admitted:
    def __init__(self) -> None:
        self.q: queue.SimpleQueue[Tensors] = queue.SimpleQueue()

    def __call__(self, tensors: Tensors) -> None:
        self.q.put(tensors)


def test_a_request_reaches_the_door_of_its_model() -> None:
    name, other = model(), model()
    admitted, elsewhere = Admitted(), Admitted()
    door, other_door = Door(name, admitted), Door(other, elsewhere)
    doors = Doors(lambda m, reason: None)
    try:
        assert door.open and other_door.open
        for i in range(3):
            doors.send(name, PrefillRequest(input_ids=(i,), max_tokens=1, request_id=rid(), reply_to="x"))
        got = [PrefillRequest.from_tensors(admitted.q.get(timeout=5)).input_ids for _ in range(3)]
        assert got == [(0,), (1,), (2,)]  # in order
        assert elsewhere.q.empty()
    finally:
        doors.close()
        door.close()
        other_door.close()


def test_a_second_instance_of_a_model_does_not_take_its_door() -> None:
    name = model()
    first, second = Door(name, Admitted()), Door(name, Admitted())
    try:
        assert first.open and not second.open
    finally:
        first.close()
        second.close()


def test_a_model_without_a_door_is_a_clear_error() -> None:
    doors = Doors(lambda m, reason: None)
    with pytest.raises(DoorError, match=r"cannot reach model 'nobody-\w+''s request channel"):
        doors.send("nobody-" + secrets.token_hex(4), DecodeCancel(request_id=rid()))


def test_a_closed_door_fails_the_models_requests_at_once() -> None:
    name = model()
    lost: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    door = Door(name, Admitted())
    doors = Doors(lambda m, reason: lost.put((m, reason)))
    try:
        doors.send(name, DecodeCancel(request_id=rid()))
        t0 = time.monotonic()
        door.close()  # the phase instance died
        assert lost.get(timeout=5) == (name, "closed its request channel")
        assert time.monotonic() - t0 < 1
        with pytest.raises(DoorError):
            doors.send(name, DecodeCancel(request_id=rid()))
    finally:
        doors.close()


def test_a_restarted_instance_is_reached_again() -> None:
    name = model()
    door = Door(name, Admitted())
    doors = Doors(lambda m, reason: None)
    try:
        doors.send(name, DecodeCancel(request_id=rid()))
        door.close()
        time.sleep(0.2)
        admitted = Admitted()
        door = Door(name, admitted)
        doors.send(name, DecodeCancel(request_id=rid()))
        assert admitted.q.get(timeout=5)
    finally:
        doors.close()
        door.close()


def test_a_malformed_request_frame_closes_only_that_connection() -> None:
    name = model()
    admitted = Admitted()
    door = Door(name, admitted)
    doors = Doors(lambda m, reason: None)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.connect("\0" + wire.door_name(name))
        raw.sendall(
            wire.frame(wire.REQUEST, wire.stream_id(rid()), bytes([1]) + b"a" + bytes([9, 0, 0, 0, 0]))
        )
        raw.settimeout(5)
        assert raw.recv(1) == b""  # closed by the door
        doors.send(name, PREFILL)
        assert PrefillRequest.from_tensors(admitted.q.get(timeout=5)) == PREFILL
    finally:
        raw.close()
        doors.close()
        door.close()


@pytest.mark.parametrize("writer", [False, True])
def test_corked_frames_go_out_together_at_the_end_of_the_block(writer: bool) -> None:
    inbox = TokenInbox()
    channels = Channels("decode", writer=writer)
    try:
        a, b = rid(), rid()
        qa, qb = inbox.open(a, "decode"), inbox.open(b, "decode")
        sa, sb = channels.sink(inbox.reply_to, a), channels.sink(inbox.reply_to, b)
        with channels.corked():
            sa.send(DecodeChunk(output_ids=(1,)), final=False)
            sb.send(DecodeChunk(output_ids=(2,)), final=False)
            sa.send(DecodeChunk(output_ids=(3,), finish_reason="length"), final=True)
            # Another thread's frames are not held by this thread's block.
            threading.Thread(target=sb.send, args=(DecodeChunk(output_ids=(4,)), False)).start()
            assert qb.get(timeout=5) == ("chunk", DecodeChunk(output_ids=(4,)))
            time.sleep(0.2)
            assert qa.empty() and qb.empty()
        assert [qa.get(timeout=5), qa.get(timeout=5)] == [
            ("chunk", DecodeChunk(output_ids=(1,))),
            ("chunk", DecodeChunk(output_ids=(3,), finish_reason="length")),
        ]
        assert qb.get(timeout=5) == ("chunk", DecodeChunk(output_ids=(2,)))
    finally:
        channels.close()
        inbox.close()


def test_a_writer_sends_everything_in_order_before_its_channels_close() -> None:
    inbox = TokenInbox()
    channels = Channels("decode", writer=True)
    try:
        a = rid()
        q = inbox.open(a, "decode")
        sink = channels.sink(inbox.reply_to, a)
        for i in range(200):
            sink.send(DecodeChunk(output_ids=(i,)), final=False)
        channels.close()  # the writer's queue is sent first
        got = [q.get(timeout=5) for _ in range(200)]
        assert [c.output_ids for _, c in got] == [(i,) for i in range(200)]  # type: ignore[union-attr]
    finally:
        inbox.close()


def test_frames_that_arrived_together_are_read_together() -> None:
    left, right = socket.socketpair()
    try:
        frames = [wire.chunk(wire.stream_id(rid()), DecodeChunk(output_ids=(i,))) for i in range(3)]
        left.sendall(b"".join(frames) + frames[0][:5])  # and the start of a fourth
        reader = wire.FrameReader(right)
        first = reader.frame()
        rest = reader.ready()
        assert [wire.parse(k, p) for k, _, p in [first, *rest]] == [
            DecodeChunk(output_ids=(i,)) for i in range(3)
        ]
        assert reader.ready() == []  # the fourth is not all there
        left.sendall(frames[0][5:])
        assert wire.parse(*reader.frame()[::2]) == DecodeChunk(output_ids=(0,))
        left.close()
        with pytest.raises(ConnectionError):
            reader.frame()
    finally:
        right.close()
