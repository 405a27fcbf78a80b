"""The outbox (backends/common/outbox.py): order per stream, merging behind a slow send, one
final response per stream, and everything sent before close() returns."""

from __future__ import annotations

import threading
import time

import numpy as np

from backends.common.outbox import Outbox
from backends.common.sink import ResponseSink
from backends.message import ClientChunk, DecodeChunk, Message


def token_outputs(ids: list[int], finish_reason: str | None) -> DecodeChunk:
    return DecodeChunk(output_ids=tuple(ids), finish_reason=finish_reason or "")


class GatedSink:
    """Records responses; each send waits for `gate` (a send that is slow to return)."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.responses: list[tuple[list[int], str, bool]] = []
        self.errors: list[str] = []
        self.first_send = threading.Event()

    def send(self, message: Message, final: bool) -> None:
        outputs = message.to_tensors()
        self.first_send.set()
        if self.gate is not None:
            assert self.gate.wait(5.0)
        if self.fail:
            raise RuntimeError("the client went away")
        reason = outputs["finish_reason"][0].decode()
        self.responses.append((outputs["output_ids"].tolist(), reason, final))

    def error(self, message: str) -> None:
        self.errors.append(message)

    def is_cancelled(self) -> bool:
        return False


def held_after_first_token() -> tuple[threading.Event, GatedSink, Outbox, ResponseSink]:
    """An outbox whose stream has sent token 1, and whose send of it is held until `gate` is set."""
    gate = threading.Event()
    inner = GatedSink(gate)
    outbox = Outbox()
    sink = outbox.sink(inner)
    sink.send(token_outputs([1], None), final=False)
    assert inner.first_send.wait(5.0)
    return gate, inner, outbox, sink


def test_tokens_queued_behind_a_slow_send_go_out_together_in_order() -> None:
    gate, inner, outbox, sink = held_after_first_token()
    for t in (2, 3, 4):
        sink.send(token_outputs([t], None), final=False)
    sink.send(token_outputs([5], "length"), final=True)
    sink.send(token_outputs([6], None), final=False)  # after the final: ignored
    gate.set()
    outbox.close()
    assert inner.responses == [([1], "", False), ([2, 3, 4, 5], "length", True)]


def test_each_token_is_its_own_response_when_sends_keep_up() -> None:
    inner = GatedSink()
    outbox = Outbox()
    sink = outbox.sink(inner)
    for t in range(5):
        sink.send(token_outputs([t], None), final=False)
        deadline = time.monotonic() + 5.0
        while len(inner.responses) <= t and time.monotonic() < deadline:
            time.sleep(0.001)
    sink.send(token_outputs([], "stop"), final=True)
    outbox.close()
    assert [ids for ids, _, _ in inner.responses] == [[0], [1], [2], [3], [4], []]
    assert [final for *_, final in inner.responses] == [False] * 5 + [True]


def test_an_error_follows_the_tokens_before_it_and_closes_the_stream() -> None:
    gate, inner, outbox, sink = held_after_first_token()
    sink.send(token_outputs([2], None), final=False)
    sink.error("KV transfer failed")
    sink.send(token_outputs([3], "length"), final=True)
    gate.set()
    outbox.close()
    assert inner.responses == [([1], "", False), ([2], "", False)]  # not final: the error is
    assert inner.errors == ["KV transfer failed"]


def test_many_streams_from_many_threads_each_keep_their_order() -> None:
    outbox = Outbox()
    inners = [GatedSink() for _ in range(8)]

    def produce(inner: GatedSink) -> None:
        sink = outbox.sink(inner)
        for t in range(200):
            sink.send(token_outputs([t], None), final=False)
        sink.send(token_outputs([200], "length"), final=True)

    threads = [threading.Thread(target=produce, args=(i,)) for i in inners]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    outbox.close()
    for inner in inners:
        ids = [t for chunk, _, _ in inner.responses for t in chunk]
        assert ids == list(range(201))
        assert [final for *_, final in inner.responses].count(True) == 1 and inner.responses[-1][2]


def test_a_failing_sink_does_not_stop_the_others() -> None:
    outbox = Outbox()
    bad, good = GatedSink(fail=True), GatedSink()
    outbox.sink(bad).send(token_outputs([1], "length"), final=True)
    outbox.sink(good).send(token_outputs([2], "length"), final=True)
    outbox.close()
    assert good.responses == [([2], "length", True)] and bad.responses == []


def test_merge_concatenates_ids_and_text_and_keeps_the_later_reason() -> None:
    a = ClientChunk(text_output="Hel", output_ids=(1, 2), finish_reason="")
    b = ClientChunk(text_output="lo", output_ids=(3,), finish_reason="stop")
    m = a.merge(b).to_tensors()
    assert m["text_output"].tolist() == [b"Hello"] and m["output_ids"].tolist() == [1, 2, 3]
    assert m["output_ids"].dtype == np.int32 and m["finish_reason"].tolist() == [b"stop"]
