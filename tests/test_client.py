"""The client library and CLI against a real tritonserver with the default repository."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import metric_values, metrics, write_repository
from tritonserver_fixture import start_tritonserver

from backends.launcher import TritonServer
from client import (
    InvalidRequestError,
    RequestTimeoutError,
    SamplingParams,
    ServerError,
    ServerUnavailableError,
    make_async_client,
    make_client,
)
from client.cli import main as cli_main

pytestmark = pytest.mark.e2e
NUM_BLOCKS = 256
PROMPT = "Once upon a time there was a harbor town"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("client")
    srv = start_tritonserver(write_repository(work / "repo", tiny_model_dir, num_blocks=NUM_BLOCKS), work)
    yield srv
    srv.stop()


def _url(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["orchestrator", "colocated"])
def test_stream_and_generate_agree(server: TritonServer, protocol: str, model: str) -> None:
    params = SamplingParams(max_tokens=24)
    with make_client(_url(server, protocol), protocol) as c:
        start = time.perf_counter()
        pieces = list(c.stream(PROMPT, params, model=model))
        whole = c.generate(PROMPT, params, model=model)
        by_ids = c.generate([*whole.token_ids[:5], 7, 9], params, model=model)
    # One piece per token unless a send fell behind and the tokens queued behind it came together
    # (backends/common/outbox.py); the orchestrator always streams the first token on its own.
    assert (2 if model == "orchestrator" else 1) <= len(pieces) <= 24
    assert "".join(p.text for p in pieces) == whole.text and whole.text
    assert tuple(t for p in pieces for t in p.token_ids) == whole.token_ids
    assert whole.finish_reason == pieces[-1].finish_reason == "length"
    assert all(p.finish_reason is None for p in pieces[:-1])
    arrivals = [p.arrival for p in pieces]
    assert start < arrivals[0] and arrivals == sorted(arrivals)
    assert len(by_ids.token_ids) == 24 and whole.latency_s > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_clients_agree_with_sync_and_run_concurrently(server: TritonServer, protocol: str) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=42)
    with make_client(_url(server, protocol), protocol) as c:
        expected = c.generate(PROMPT, params)

    async def run() -> list[tuple[int, ...]]:
        ac = make_async_client(_url(server, protocol), protocol)
        try:

            async def one() -> tuple[int, ...]:
                return tuple([t async for p in ac.stream(PROMPT, params) for t in p.token_ids])

            results = await asyncio.gather(*(one() for _ in range(6)))
            results.append((await ac.generate(PROMPT, params)).token_ids)
            return results
        finally:
            await ac.close()

    assert all(ids == expected.token_ids for ids in asyncio.run(run())), "same seed, same tokens"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_errors_are_clear(server: TritonServer, protocol: str) -> None:
    with make_client(_url(server, protocol), protocol) as c:
        with pytest.raises(ServerError, match="context is 2048"):
            list(c.stream([5] * 2100, SamplingParams(max_tokens=4)))
        with pytest.raises(ServerError, match="unknown model"):
            c.generate(PROMPT, model="no_such_model")
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            c.generate(PROMPT, SamplingParams(max_tokens=0))
        with pytest.raises(InvalidRequestError, match="empty"):
            c.generate("")
        assert c.generate(PROMPT, SamplingParams(max_tokens=3)).finish_reason == "length", "still usable"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server(protocol: str) -> None:
    with make_client("127.0.0.1:1", protocol) as c, pytest.raises(ServerUnavailableError):
        c.generate(PROMPT, SamplingParams(max_tokens=2), timeout_s=10)


def _free_decode_blocks(server: TritonServer) -> float:
    return sum(metric_values(metrics(server.metrics_url), "disagg_kv_free_blocks", model="decode"))


def _wait_blocks_free(server: TritonServer, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (free := _free_decode_blocks(server)) != NUM_BLOCKS and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_timeout_and_early_exit_cancel_on_the_server(server: TritonServer) -> None:
    long = SamplingParams(max_tokens=1500)
    with make_client(server.grpc_url, "grpc") as c:
        t0 = time.perf_counter()
        with pytest.raises(RequestTimeoutError):
            list(c.stream(PROMPT, long, timeout_s=0.5))
        assert time.perf_counter() - t0 < 3
        assert _wait_blocks_free(server) == NUM_BLOCKS, "timed-out request must release its KV blocks"

        it = c.stream(PROMPT, long)
        first = [next(it) for _ in range(3)]
        assert _free_decode_blocks(server) < NUM_BLOCKS, "a sequence is in flight"
        it.close()  # what leaving a for loop early does to a dropped generator
        assert len(first) == 3
        assert _wait_blocks_free(server) == NUM_BLOCKS, "a dropped stream must be cancelled"

    async def cancel_task() -> None:
        ac = make_async_client(server.grpc_url, "grpc")
        try:
            task = asyncio.create_task(ac.generate(PROMPT, long))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await ac.close()

    asyncio.run(cancel_task())
    assert _wait_blocks_free(server) == NUM_BLOCKS, "a cancelled task must cancel its request"


def test_cli(server: TritonServer, capsys: pytest.CaptureFixture[str]) -> None:
    with make_client(server.grpc_url, "grpc") as c:
        expected = c.generate(PROMPT, SamplingParams(max_tokens=10)).text
    args = ["generate", PROMPT, "--max-tokens", "10"]
    assert cli_main([*args, "--url", server.grpc_url, "--stream", "--timings"]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n" and "ttft=" in out.err
    assert cli_main([*args, "--url", server.http_url, "--protocol", "http"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert cli_main([*args, "--url", server.grpc_url, "--max-tokens", "0"]) == 1
    assert "max_tokens must be a positive integer" in capsys.readouterr().err


def test_bench_run_measures_ttft_like_the_server(server: TritonServer) -> None:
    from client.bench.requests import BenchRequest, arrival_times
    from client.bench.runner import run_rate, server_ttft
    from client.bench.stats import summarize

    reqs = [BenchRequest([3 + (i * 7) % 900 for i in range(n)], 20) for n in (40, 300, 700, 120, 500, 60)]
    before = server_ttft(server.metrics_url, "orchestrator")
    res = run_rate(
        server.grpc_url, "grpc", "orchestrator", reqs, arrival_times(len(reqs), 4.0, 1.0, 0).tolist()
    )
    after = server_ttft(server.metrics_url, "orchestrator")
    assert all(r.error is None and r.output_len == 20 for r in res.records), "exact output lengths"
    s = summarize(res.records, 4.0, res.duration_s, ttft_slo=60.0, tpot_slo=60.0)
    assert s["attainment"] == 1.0 and s["throughput_rps"] > 0
    assert after[1] - before[1] == len(reqs)
    server_mean = (after[0] - before[0]) / len(reqs)
    # The client measures from send, the server from arrival in the model: the client's is larger
    # by the network and queueing in front of the model, a few ms on loopback.
    assert server_mean <= s["ttft"]["mean"] <= server_mean * 1.25 + 0.02


def test_bench_overhead_measures_both_paths(server: TritonServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m client.bench overhead`, short: both models at 1 and 2 streams, the ratios and the
    last line, and the JSON agrees with what was printed."""
    from client.bench.cli import main as bench_main

    out = Path(tempfile.mkdtemp()) / "overhead.json"
    argv = ["overhead", "--url", server.grpc_url, "--streams", "1,2", "--rounds", "2", "--requests", "2",
            "--max-tokens", "8", "--out", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out.read_text())
    assert [r["streams"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        for model in ("orchestrator", "colocated"):
            s = row[model]
            assert 0 < s["ttft_p50_ms"] <= s["ttft_p90_ms"] and 0 < s["tpot_p50_ms"] <= s["tpot_p90_ms"]
        assert row["tpot_ratio"] == pytest.approx(
            row["orchestrator"]["tpot_p50_ms"] / row["colocated"]["tpot_p50_ms"]
        )
    worst = max(r["tpot_ratio"] for r in result["rows"])
    extra = max(r["ttft_extra_ms"] for r in result["rows"])
    assert printed[-1] == f"overhead: TPOT ratio {worst:.2f}, TTFT {extra:+.1f} ms"
