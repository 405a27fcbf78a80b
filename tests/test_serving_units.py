"""Unit tests of the serving logic that runs inside the Triton models (no server needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backends.common.client_stream import ClientStream, RequestMetrics
from backends.common.params import EngineParams
from backends.common.text_stream import TextStream
from backends.message import ClientRequest, Message
from backends.orchestrator.pipeline import PhaseError, watched, watched_batches
from backends.orchestrator.router import Router, RoutingTable
from engine.config import EngineConfig
from engine.errors import RequestError
from engine.tokenizer import load_tokenizer


class RecordingSink:
    def __init__(self) -> None:
        self.responses: list[tuple[dict[str, np.ndarray], bool]] = []
        self.errors: list[str] = []

    def send(self, message: Message, final: bool) -> None:
        self.responses.append((message.to_tensors(), final))

    def error(self, message: str) -> None:
        self.errors.append(message)

    def is_cancelled(self) -> bool:
        return False


def _request(**arrays: object) -> dict[str, np.ndarray]:
    base: dict[str, object] = {
        "text_input": np.array([b"hello"], dtype=object),
        "max_tokens": np.array([4], dtype=np.int32),
    }
    base.update(arrays)
    return {k: np.asarray(v) for k, v in base.items() if v is not None}


def test_client_request_parsing_and_defaults() -> None:
    req = ClientRequest.from_tensors(_request())
    assert req.text == "hello" and req.params.max_tokens == 4 and req.params.greedy and not req.stream
    req = ClientRequest.from_tensors(
        _request(
            stream=np.array([True]),
            temperature=np.array([0.7], np.float32),
            random_seed=np.array([9], np.uint64),
            end_id=np.array([5], np.int32),
            stop_words=np.array([b"\n\n", b"END"], dtype=object),
        )
    )
    assert req.stream and req.params.temperature == pytest.approx(0.7) and req.params.seed == 9
    assert req.params.stop_token_ids == (5,) and req.params.ignore_eos, "end_id replaces the model's EOS"
    assert req.stop_words == ("\n\n", "END")


def test_request_parameters_other_than_tritons_are_refused() -> None:
    from backends.message import check_parameters

    check_parameters({"triton_enable_empty_final_response": True, "priority": 1})
    with pytest.raises(RequestError, match="unknown input or option 'stop_word'"):
        check_parameters({"stop_word": "x"})


def test_tensorrt_llm_spellings() -> None:
    """An empty stop word means none; `seed` is random_seed's newer name; the penalties,
    min_tokens and return_log_probs reach the engine's parameters."""
    req = ClientRequest.from_tensors(
        _request(
            stop_words=np.array([b""], dtype=object),
            seed=np.array([7], np.uint64),
            repetition_penalty=np.array([1.2], np.float32),
            presence_penalty=np.array([0.5], np.float32),
            frequency_penalty=np.array([-0.25], np.float32),
            min_tokens=np.array([2], np.int32),
            return_log_probs=np.array([True]),
        )
    )
    p = req.params
    assert req.stop_words == () and p.seed == 7
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == pytest.approx((1.2, 0.5, -0.25))
    assert p.min_tokens == 2 and p.logprobs
    same = _request(seed=np.array([7], np.uint64), random_seed=np.array([7], np.uint64))
    assert ClientRequest.from_tensors(same).params.seed == 7
    older = _request(min_length=np.array([3], np.int32))  # min_tokens' older name
    assert ClientRequest.from_tensors(older).params.min_tokens == 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"text_input": None}, "give exactly one of 'text_input' or 'input_ids'"),
        ({"input_ids": np.array([1, 2], np.int32)}, "give exactly one of"),
        ({"max_tokens": None}, "missing required input 'max_tokens'"),
        ({"max_tokens": np.array([2.5], np.float32)}, "'max_tokens' must be an integer"),
        ({"text_input": np.array([b"a", b"b"], dtype=object)}, "exactly one string"),
        ({"stop_words": np.array([b"x" * 257], dtype=object)}, "each stop word must have at most 256"),
        (
            {"seed": np.array([3], np.uint64), "random_seed": np.array([4], np.uint64)},
            "'seed' .* same option",
        ),
        ({"min_tokens": np.array([9], np.int32)}, r"min_tokens must be an integer in \[0, max_tokens=4\]"),
        (
            {"min_length": np.array([1], np.int32), "min_tokens": np.array([2], np.int32)},
            "'min_length' .* same option",
        ),
        (
            {"bad_word_ids": np.array([3, 4], np.int32), "bad_word_lens": np.array([1], np.int32)},
            "bad_word_lens must be positive and add up to the 2 bad_word_ids",
        ),
        (
            {"repetition_penalty": np.array([0.0], np.float32)},
            "repetition_penalty must be a finite number > 0",
        ),
        ({"end_id": np.array([-1], np.int32)}, "end_id must be a token id >= 0"),
    ],
)
def test_client_request_errors(arrays: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        ClientRequest.from_tensors(_request(**arrays))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return load_tokenizer(tiny_model_dir)


def test_stop_word_is_never_sent_even_split_across_tokens(tokenizer: object) -> None:
    text = "The harbor town woke before the sun. Fishermen carried nets"
    ids = tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]
    stream = TextStream(tokenizer, stop_words=("before the",))
    sent = ""
    for t in ids:
        piece = stream.push([t])
        sent += piece.text
        assert "before" not in sent
        if piece.stopped:
            break
    assert piece.stopped and sent == "The harbor town woke "


def test_client_stream_streaming_and_whole(tokenizer: object) -> None:
    ids = tokenizer("Numbers tell stories too", add_special_tokens=False).input_ids  # type: ignore[operator]
    streaming, whole = RecordingSink(), RecordingSink()
    for sink, mode in ((streaming, True), (whole, False)):
        cs = ClientStream(sink, tokenizer, stream=mode)
        for i, t in enumerate(ids):
            ended = cs.push([t], "length" if i == len(ids) - 1 else None)
        assert ended
    assert len(streaming.responses) == len(ids) and [f for _, f in streaming.responses] == [False] * (
        len(ids) - 1
    ) + [True]
    text = "".join(o["text_output"][0].decode() for o, _ in streaming.responses)
    [(out, final)] = whole.responses
    assert final and out["text_output"][0].decode() == text == "Numbers tell stories too"
    assert out["output_ids"].tolist() == ids and out["finish_reason"][0] == b"length"


def test_client_stream_takes_several_tokens_at_once_and_cuts_ids_at_a_stop_word(tokenizer: object) -> None:
    ids = tokenizer("Numbers tell stories too. END and more", add_special_tokens=False).input_ids  # type: ignore[operator]
    one, many = RecordingSink(), RecordingSink()
    per_token = ClientStream(one, tokenizer, stream=True, stop_words=("END",))
    for t in ids:
        if per_token.push([t]):
            break
    chunked = ClientStream(many, tokenizer, stream=True, stop_words=("END",))
    assert not chunked.push(ids[:2]) and chunked.push(ids[2:])
    assert chunked.ids == per_token.ids and len(chunked.ids) < len(ids)  # nothing after the stop word
    text = ["".join(o["text_output"][0].decode() for o, _ in sink.responses) for sink in (one, many)]
    assert text[0] == text[1] == "Numbers tell stories too. "
    assert [f for _, f in many.responses] == [False, True] and many.responses[-1][0]["finish_reason"][
        0
    ] == b"stop"


def test_router_picks_least_outstanding_tokens() -> None:
    router = Router(["a", "b"])
    with router.route(100) as first, router.route(10) as second, router.route(5) as third:
        assert (first, second, third) == ("a", "b", "b")
        assert router.outstanding("a") == 100 and router.outstanding("b") == 15
    assert router.outstanding("a") == router.outstanding("b") == 0
    with pytest.raises(ValueError, match="at least one model"):
        Router([])


def test_watched_passes_items_raises_inband_errors_and_stalls() -> None:
    ok = [{"output_ids": np.array([1])}, {"output_ids": np.array([2])}]
    assert [int(r["output_ids"][0]) for r in watched(ok, 1.0, "decode")] == [1, 2]
    bad = [
        {
            "finish_reason": np.array([b"error"], dtype=object),
            "error_message": np.array([b"KV transfer failed"], dtype=object),
        }
    ]
    with pytest.raises(PhaseError, match="KV transfer failed"):
        list(watched(bad, 1.0, "decode"))

    release = threading.Event()

    def stalls() -> Iterator[dict[str, np.ndarray]]:
        yield {"output_ids": np.array([1])}
        release.wait(10)  # a callee that stopped answering

    started = time.monotonic()
    with pytest.raises(PhaseError, match=r"decode sent nothing for 0\.3 s"):
        list(watched(stalls(), 0.3, "decode"))
    assert time.monotonic() - started < 3
    release.set()


def test_watched_batches_hands_over_what_has_arrived_together() -> None:
    go, queued = threading.Event(), threading.Event()

    def burst() -> Iterator[dict[str, np.ndarray]]:
        yield {"output_ids": np.array([1])}
        go.wait(10)
        for t in (2, 3):
            yield {"output_ids": np.array([t])}
        yield {
            "finish_reason": np.array([b"error"], dtype=object),
            "error_message": np.array([b"decode died"], dtype=object),
        }
        queued.set()  # resumed after the last yield: the reader thread has queued everything

    batches = watched_batches(burst(), 5.0, "decode")
    assert [int(r["output_ids"][0]) for r in next(batches)] == [1]
    go.set()
    assert queued.wait(5.0)
    assert [int(r["output_ids"][0]) for r in next(batches)] == [2, 3]  # the tokens before the error
    with pytest.raises(PhaseError, match="decode died"):
        next(batches)


def engine_config(raw: dict[str, str], root: Path) -> EngineConfig:
    return EngineParams.from_parameters(raw).engine_config(root)


def test_engine_config_from_parameters(tiny_model_dir: Path) -> None:
    root = tiny_model_dir.parent
    cfg = engine_config({"model_dir": tiny_model_dir.name, "num_blocks": "64", "num_threads": "1"}, root)
    assert cfg.num_blocks == 64 and cfg.num_threads == 1 and Path(cfg.model_dir) == tiny_model_dir.resolve()
    with pytest.raises(ValueError, match="parameter 'num_blocks' must be an integer"):
        engine_config({"model_dir": tiny_model_dir.name, "num_blocks": "many"}, root)
    with pytest.raises(ValueError, match=r"no config\.json"):
        engine_config({"model_dir": "nowhere"}, root)
    assert engine_config({"model_dir": tiny_model_dir.name, "tp_size": "2"}, root).tp_size == 2
    assert engine_config({"model_dir": tiny_model_dir.name, "pp_size": "2"}, root).world_size == 2
    with pytest.raises(ValueError, match=r"must name one GPU per rank \(4: tp_size x pp_size\)"):
        engine_config(
            {
                "model_dir": tiny_model_dir.name,
                "device": "cuda",
                "device_ids": "0,1",
                "tp_size": "2",
                "pp_size": "2",
            },
            root,
        )
    assert cfg.decode_attention == "auto"
    paged = engine_config({"model_dir": tiny_model_dir.name, "decode_attention": "paged"}, root)
    assert paged.decode_attention == "paged"
    with pytest.raises(ValueError, match="decode_attention must be auto, dense or paged"):
        engine_config({"model_dir": tiny_model_dir.name, "decode_attention": "fast"}, root)


def test_routing_groups_keep_a_request_in_one_group() -> None:
    table = RoutingTable.parse(
        "prefill_0,prefill_1", "decode_0,decode_1", "prefill_0:decode_0;prefill_1:decode_1"
    )
    p, d = table.pick()
    with p.route(500), d.route(100):
        p2, d2 = table.pick()
        assert (p2.models, d2.models) == (["prefill_1"], ["decode_1"]), "the loaded group is avoided"
    flat = RoutingTable.parse("prefill", "decode")
    assert [(p.models, d.models) for p, d in flat.groups] == [(["prefill"], ["decode"])]
    with pytest.raises(ValueError, match="exactly once"):
        RoutingTable.parse("prefill_0,prefill_1", "decode_0", "prefill_0:decode_0")
    with pytest.raises(ValueError, match="must be 'prefill"):
        RoutingTable.parse("prefill_0", "decode_0", "prefill_0")


def test_metric_catalog_declares_each_family_once() -> None:
    from backends.common.metrics import CATALOG

    names = [m.name for m in CATALOG]
    assert len(names) == len(set(names))
    for m in CATALOG:
        assert m.kind in ("gauge", "counter", "histogram") and m.name.startswith("disagg_") and m.description
        assert (m.kind == "histogram") == bool(m.buckets), m.name
        assert (m.kind == "counter") == m.name.endswith("_total"), m.name
        assert list(m.buckets) == sorted(m.buckets)


def test_coalesced_metric_updates_leave_every_metric_as_the_whole_list_does() -> None:
    from backends.common.metrics import coalesce

    updates = [
        ("free", "set", 10.0), ("lat", "observe", 0.5), ("free", "set", 9.0), ("n", "increment", 2.0),
        ("lat", "observe", 0.25), ("n", "increment", 3.0), ("free", "set", 9.0), ("lat", "observe", 0.5),
    ]  # fmt: skip
    out = coalesce(updates)
    assert sorted(out) == [
        ("free", "set", 9.0), ("lat", "observe", 0.25), ("lat", "observe", 0.5), ("lat", "observe", 0.5),
        ("n", "increment", 5.0),
    ]  # fmt: skip
    assert coalesce([]) == []


class _Count:
    def __init__(self) -> None:
        self.value = 0.0

    def increment(self, value: float) -> None:
        self.value += value


def test_client_stream_counts_tokens_and_failures(tokenizer: object) -> None:
    """The prompt once its first token is out, the tokens sent once the request ends (completed,
    cancelled or failed), and each failure."""
    counts = {name: _Count() for name in ("prompt_tokens", "generation_tokens", "failures")}
    metrics = RequestMetrics(**counts)  # type: ignore[arg-type]
    done = ClientStream(RecordingSink(), tokenizer, stream=True, metrics=metrics, prompt_len=7)
    done.push([5])
    assert (counts["prompt_tokens"].value, counts["generation_tokens"].value) == (7, 0)
    done.push([6, 7], "length")
    cancelled = ClientStream(RecordingSink(), tokenizer, stream=True, metrics=metrics, prompt_len=3)
    cancelled.push([5])
    cancelled.cancelled()
    failed = ClientStream(RecordingSink(), tokenizer, stream=True, metrics=metrics, prompt_len=2)
    failed.push([5, 6])
    failed.error("decode died")
    failed.error("again")  # a stream ends once
    assert {k: c.value for k, c in counts.items()} == {
        "prompt_tokens": 12, "generation_tokens": 6, "failures": 1,
    }  # fmt: skip


_LOWER_PRIORITY = """
import os, sys, threading
from backends.common.cpu_priority import lower_priority
start, stop = threading.Event(), threading.Event()
t = threading.Thread(target=lambda: (start.set(), stop.wait()), daemon=True)
t.start(); start.wait()
got = lower_priority(int(sys.argv[1]))
each = {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")}
later = []
u = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
u.start(); u.join(); stop.set()
print(got, *sorted(each), *later)
"""


@pytest.mark.parametrize("increment", [0, 3, 30])
def test_lower_priority_lowers_every_thread_and_what_they_start(increment: int) -> None:
    """In a child process (this one keeps its priority): the threads running before the call and one
    started after it all end at the process's nice value plus the increment, at most 19."""
    import os
    import subprocess
    import sys

    from backends.common.cpu_priority import lower_priority

    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run(
        [sys.executable, "-c", _LOWER_PRIORITY, str(increment)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    ).stdout.split()  # fmt: skip
    expected = str(min(19, base + increment))
    assert out == [
        expected,
        expected,
        expected,
    ]  # the caller's, every thread's (one value), the later thread's
    with pytest.raises(ValueError, match="must be >= 0"):
        lower_priority(-1)
