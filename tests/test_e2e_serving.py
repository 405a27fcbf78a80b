"""End to end on a real tritonserver: orchestrator (prefill -> KV transfer -> decode) against the
colocated model and transformers, over gRPC streaming and HTTP generate."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from serving import (
    StreamResult,
    client_inputs,
    metric_values,
    metrics,
    stream_many,
    stub_pids,
    write_repository,
)
from tritonserver_fixture import start_tritonserver

from backends.common.cpu_priority import MAX_NICE
from backends.launcher import TritonServer
from planner.deployment import DECODE_CPU_NICE

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a harbor town",
    "A",
    "Memory holds the data a program works on. Fast memory is small and expensive",
    "Questions are the beginning of every discovery",
    "In the spring a stranger arrived on the morning ferry with a wooden case",
    "Numbers tell stories too: one, two, three",
    "The baker said",
]
NUM_BLOCKS = 256


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("e2e")
    repo = write_repository(work / "repo", tiny_model_dir, num_blocks=NUM_BLOCKS)
    srv = start_tritonserver(repo, work)
    yield srv
    srv.stop()


def _hf_greedy(model_dir: Path, prompt: str, max_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        return list(
            model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
        )


def _free_blocks(server: TritonServer) -> dict[str, float]:
    text = metrics(server.metrics_url)
    return {
        m: sum(metric_values(text, "disagg_kv_free_blocks", model=m))
        for m in ("prefill", "decode", "colocated")
    }


def _all_blocks_free(server: TritonServer, timeout: float = 10.0) -> dict[str, float]:
    """Free block counts once every pool is whole again (leases end a moment after the last token)."""
    deadline = time.monotonic() + timeout
    while True:
        free = _free_blocks(server)
        if all(v == NUM_BLOCKS for v in free.values()) or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def _prefill_batches(server: TritonServer) -> float:
    return sum(metric_values(metrics(server.metrics_url), "disagg_prefill_batch_tokens_count"))


def test_sixteen_streams_match_colocated_and_transformers(server: TritonServer, tiny_model_dir: Path) -> None:
    cases = [(PROMPTS[i % len(PROMPTS)], 8 + 5 * i) for i in range(16)]
    requests = [client_inputs(p, n) for p, n in cases]
    disagg = stream_many(server.grpc_url, "orchestrator", requests)
    coloc = stream_many(server.grpc_url, "colocated", requests)
    for (prompt, n), d, c in zip(cases, disagg, coloc, strict=True):
        assert d.error is None and c.error is None
        assert d.output_ids == c.output_ids, prompt
        assert d.text == c.text and d.finish_reason == c.finish_reason == "length"
        # Streaming: the first token alone, then the rest; tokens that queue behind a send share
        # a response (backends/common/outbox.py), so at most one response per token.
        assert 2 <= d.responses <= n
    for prompt, n in {(p, n) for p, n in cases[:6]}:
        expected = _hf_greedy(tiny_model_dir, prompt, n)
        got = disagg[cases.index((prompt, n))]
        assert got.output_ids == expected


def test_decode_runs_at_the_lower_cpu_priority_its_parameters_ask(server: TritonServer) -> None:
    """cpu_nice: every thread of decode's stub (the loop, the writers, the KV pulls, the stub's own)
    runs at the server's nice value plus the repository's increment; prefill's and colocated's at
    the server's."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the server inherits the test's nice value
    for model, increment in (("prefill", 0), ("decode", DECODE_CPU_NICE), ("colocated", 0)):
        [pid] = stub_pids(server.config.model_repository, model)
        nice = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                nice.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
        assert nice == {min(MAX_NICE, base + increment)}, model


def test_a_burst_of_long_prompts_is_prefilled_in_shared_batches(server: TritonServer) -> None:
    """Requests that arrive together are prefilled together: the orchestrator's calls overlap.

    The 2.51 stub starts one BLS call at a time (each waits for the callee's "accepted"), so a
    burst reaches prefill one request per call hop. The prompts are long enough (~185 tokens, tens
    of ms of prefill here) that requests arriving during a prefill wait and share the next batch;
    with prompts of a few tokens, prefill can finish each before the next arrives."""
    prompt = "Memory holds the data a program works on. Fast memory is small and expensive. " * 8
    n = 8
    batches_before = _prefill_batches(server)
    results = stream_many(server.grpc_url, "orchestrator", [client_inputs(prompt, 2)] * n)
    assert all(r.error is None and len(r.output_ids) == 2 for r in results)
    assert len({tuple(r.output_ids) for r in results}) == 1  # batched prefill, the same tokens
    assert _prefill_batches(server) - batches_before < n


def test_penalties_min_tokens_and_log_probs_equal_colocated(
    server: TritonServer, tiny_model_dir: Path
) -> None:
    """TensorRT-LLM's sampling inputs through both paths: penalties and min_tokens change what is
    drawn (the sequence's history spans prefill and decode), log-probabilities come back per token."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.tokenizer import load_tokenizer

    options = {
        "repetition_penalty": np.array([0.6], np.float32),  # < 1: seen tokens favoured
        "presence_penalty": np.array([-0.5], np.float32),
        "frequency_penalty": np.array([0.3], np.float32),
        "min_tokens": np.array([6], np.int32),
        "return_log_probs": np.array([True]),
    }
    requests = [client_inputs(p, 12, **options) for p in PROMPTS[:4]]
    disagg = stream_many(server.grpc_url, "orchestrator", requests)
    coloc = stream_many(server.grpc_url, "colocated", requests)
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=128))
    params = SamplingParams(max_tokens=12, repetition_penalty=0.6, presence_penalty=-0.5, frequency_penalty=0.3,
                            min_tokens=6, logprobs=True)  # fmt: skip
    expected = engine.generate([tokenizer(p).input_ids for p in PROMPTS[:4]], params)
    plain = stream_many(server.grpc_url, "orchestrator", [client_inputs(p, 12) for p in PROMPTS[:4]])
    assert [d.output_ids for d in disagg] != [p.output_ids for p in plain], "the penalties changed nothing"
    for d, c, e in zip(disagg, coloc, expected, strict=True):
        assert d.error is None and c.error is None
        assert d.output_ids == c.output_ids == e.output_ids
        # Batches of different shapes round differently in the last float bits: 1e-4.
        assert d.log_probs == pytest.approx(c.log_probs, abs=1e-4)
        assert d.log_probs == pytest.approx(e.output_logprobs, abs=1e-4) and len(d.log_probs) == 12
        assert d.cum_log_probs == pytest.approx(sum(e.output_logprobs), abs=1e-3)
        assert c.cum_log_probs == pytest.approx(sum(e.output_logprobs), abs=1e-3)
    assert all(p.log_probs == () and p.cum_log_probs is None for p in plain)  # only when asked


def test_non_streaming_returns_everything_once(server: TritonServer) -> None:
    [streamed] = stream_many(server.grpc_url, "orchestrator", [client_inputs(PROMPTS[1], 20)])
    [whole] = stream_many(server.grpc_url, "orchestrator", [client_inputs(PROMPTS[1], 20, stream=False)])
    assert whole.responses == 1
    assert whole.output_ids == streamed.output_ids and whole.text == streamed.text


def test_http_generate_and_generate_stream(server: TritonServer) -> None:
    [ref] = stream_many(server.grpc_url, "orchestrator", [client_inputs(PROMPTS[0], 12)])
    body = json.dumps({"text_input": PROMPTS[0], "max_tokens": 12}).encode()
    req = urllib.request.Request(
        f"{server.http_url}/v2/models/orchestrator/generate", data=body, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    assert (
        out["text_output"] == ref.text
        and out["output_ids"] == ref.output_ids
        and out["finish_reason"] == "length"
    )

    body = json.dumps({"text_input": PROMPTS[0], "max_tokens": 12, "stream": True}).encode()
    req = urllib.request.Request(
        f"{server.http_url}/v2/models/orchestrator/generate_stream", data=body, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [
            json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")
        ]
    assert "".join(e["text_output"] for e in events) == ref.text
    # Triton's generate JSON writes a one-element tensor as a scalar.
    ids = [
        i
        for e in events
        for i in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])
    ]
    assert ids == ref.output_ids


def test_sixty_four_streams_batch_in_decode(server: TritonServer) -> None:
    before = metrics(server.metrics_url)
    requests = [client_inputs(PROMPTS[i % len(PROMPTS)], 24) for i in range(64)]
    results = stream_many(server.grpc_url, "orchestrator", requests, timeout=300)
    assert all(r.error is None and len(r.output_ids) == 24 for r in results)
    after = metrics(server.metrics_url)

    def batches_over_one(text: str) -> float:
        ones = sum(metric_values(text, "disagg_decode_batch_size_bucket", model="decode", le="1"))
        total = sum(metric_values(text, "disagg_decode_batch_size_count", model="decode"))
        return total - ones

    assert batches_over_one(after) - batches_over_one(before) > 0, "decode must batch concurrent streams"
    assert _all_blocks_free(server) == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS, "colocated": NUM_BLOCKS}


def _replace(
    inputs: list[grpcclient.InferInput], name: str, arr: np.ndarray, dtype: str
) -> list[grpcclient.InferInput]:
    bad = grpcclient.InferInput(name, list(arr.shape), dtype)
    bad.set_data_from_numpy(arr)
    return [i for i in inputs if i.name() != name] + [bad]


def _f32(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float32)


# (request inputs, words the error must contain)
BAD_INPUTS: list[tuple[Callable[[], list[grpcclient.InferInput]], str]] = [
    (lambda: client_inputs("", 8), "text_input' is empty"),
    (lambda: client_inputs(PROMPTS[0], 0), "max_tokens must be a positive integer"),
    (lambda: client_inputs(PROMPTS[0], -5), "max_tokens must be a positive integer"),
    (lambda: client_inputs(PROMPTS[0], 5000), "exceeds the context of 2048"),
    (lambda: client_inputs("harbor " * 2100, 8), "the context is 2048"),
    (
        lambda: client_inputs(PROMPTS[0], 8, temperature=_f32(-1.0)),
        "temperature must be a finite number >= 0",
    ),
    (lambda: client_inputs(PROMPTS[0], 8, top_p=_f32(1.5)), "top_p must be in (0, 1]"),
    (
        lambda: client_inputs(PROMPTS[0], 8, top_k=np.array([-2], dtype=np.int32)),
        "top_k must be an integer >= 0",
    ),
    (
        lambda: client_inputs(None, 8, text_input=np.array([b"\xff\xfe broken"], dtype=object)),
        "not valid UTF-8",
    ),
    (
        lambda: _replace(client_inputs(PROMPTS[0], 8), "max_tokens", _f32(8.0), "FP32"),
        "input 'max_tokens' data-type is 'FP32', but model",
    ),
    (
        lambda: _replace(
            client_inputs(PROMPTS[0], 8), "max_tokens", np.array([8, 9], dtype=np.int32), "INT32"
        ),
        "unexpected shape for input 'max_tokens'",
    ),
]


@pytest.mark.parametrize("model", ["orchestrator", "colocated"])
def test_bad_inputs_get_clear_errors_while_others_continue(server: TritonServer, model: str) -> None:
    good: list[StreamResult] = []
    worker = threading.Thread(
        target=lambda: good.extend(stream_many(server.grpc_url, model, [client_inputs(PROMPTS[3], 96)]))
    )
    worker.start()
    for make_inputs, message in BAD_INPUTS:
        [result] = stream_many(server.grpc_url, model, [make_inputs()])
        assert result.error is not None and message in result.error, (message, result.error)
    worker.join(timeout=120)
    assert len(good) == 1 and good[0].error is None and len(good[0].output_ids) == 96
    # Still serving, and every KV block is back.
    [after] = stream_many(server.grpc_url, model, [client_inputs(PROMPTS[0], 4)])
    assert after.error is None and len(after.output_ids) == 4
    assert _all_blocks_free(server) == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS, "colocated": NUM_BLOCKS}
