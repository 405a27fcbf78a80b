"""The orchestrator's Forwarder (decode's tokens to the client on the inbox's reader thread): what
it pushes, how it ends, and its stall timeout. The whole path runs in the e2e and fault tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from backends.common.client_stream import ClientStream
from backends.message import DecodeChunk, Message
from backends.orchestrator.forwarder import Forwarder, ForwardError
from backends.orchestrator.inbox import Item
from engine.tokenizer import load_tokenizer


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, np.ndarray], bool]] = []
        self.errors: list[str] = []
        self.cancelled = False

    def send(self, message: Message, final: bool) -> None:
        self.sent.append((message.to_tensors(), final))

    def error(self, message: str) -> None:
        self.errors.append(message)

    def is_cancelled(self) -> bool:
        return self.cancelled


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return load_tokenizer(tiny_model_dir)


def ids_sent(sink: Sink) -> list[list[int]]:
    return [list(tensors["output_ids"]) for tensors, _ in sink.sent]


def chunk(*ids: int, reason: str = "") -> Item:
    return ("chunk", DecodeChunk(output_ids=ids, finish_reason=reason))


def test_tokens_go_out_as_they_come_and_together_when_they_came_together(tokenizer: object) -> None:
    sink = Sink()
    fwd = Forwarder(ClientStream(sink, tokenizer, stream=True), stall_s=5)
    fwd.deliver([chunk(5)])
    fwd.deliver([("chunk", DecodeChunk()), chunk(6)])  # a heartbeat, then a token
    fwd.deliver([chunk(7), chunk(8), chunk(9, reason="length"), chunk(10)])  # after the last: dropped
    assert fwd.wait() == "finished"
    assert ids_sent(sink) == [[5], [6], [7, 8, 9]]
    assert [final for _, final in sink.sent] == [False, False, True]
    fwd.deliver([chunk(11)])  # done: nothing more is pushed
    assert len(sink.sent) == 3


def test_a_stop_word_stops_and_a_cancelled_client_cancels(tokenizer: object) -> None:
    text = "Numbers tell stories too. END and more"
    ids = tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]
    sink = Sink()
    fwd = Forwarder(ClientStream(sink, tokenizer, stream=True, stop_words=("END",)), stall_s=5)
    fwd.deliver([chunk(t) for t in ids])
    assert fwd.wait() == "stopped"  # decode must be told to stop
    assert sink.sent[-1][1] and "END" not in "".join(str(t["text_output"][0], "utf-8") for t, _ in sink.sent)

    gone = Sink()
    fwd = Forwarder(ClientStream(gone, tokenizer, stream=True), stall_s=5)
    fwd.deliver([chunk(5)])
    gone.cancelled = True
    fwd.deliver([("chunk", DecodeChunk())])  # even a heartbeat finds the client gone
    assert fwd.wait() == "cancelled" and len(gone.sent) == 1


@pytest.mark.parametrize("kind", ["error", "lost"])
def test_an_error_or_a_lost_decode_ends_the_wait_with_its_message(tokenizer: object, kind: str) -> None:
    sink = Sink()
    fwd = Forwarder(ClientStream(sink, tokenizer, stream=True), stall_s=5)
    fwd.deliver([chunk(5), (kind, "decode instance out of service")])  # type: ignore[list-item]
    with pytest.raises(ForwardError, match="out of service"):
        fwd.wait()
    assert ids_sent(sink) == [[5]]  # what came before the error was forwarded


def test_a_silent_decode_fails_after_the_stall_timeout_and_heartbeats_keep_it_alive(
    tokenizer: object,
) -> None:
    fwd = Forwarder(ClientStream(Sink(), tokenizer, stream=True), stall_s=0.3)
    beating = threading.Event()

    def heartbeats() -> None:
        while not beating.wait(0.1):
            fwd.deliver([("chunk", DecodeChunk())])

    threading.Thread(target=heartbeats, daemon=True).start()
    time.sleep(0.8)  # longer than the stall timeout, with heartbeats
    beating.set()  # decode goes silent
    t0 = time.monotonic()
    with pytest.raises(ForwardError, match=r"sent nothing for 0\.3 s"):
        fwd.wait()
    assert 0.1 < time.monotonic() - t0 < 2.0
