"""Tensor- and pipeline-parallel instances on a real tritonserver: prefill TP=2 -> decode TP=1,
TP=1 -> TP=2, PP=2 -> PP=1 and PP=1 -> PP=2 give exactly colocated (TP 1, PP 1)'s tokens, leave
every KV block free on every rank and stage and no lease; a worker rank (a tensor-parallel rank or a
pipeline stage) killed mid-stream gives the clients an error, not a hang; a bad request never
reaches the workers; stopping the server leaves no worker process and no shared-memory segment."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import tritonclient.grpc as grpcclient
from serving import client_inputs, metric_values, metrics, set_parameter, stream_many, stub_pids
from tritonserver_fixture import start_tritonserver

from backends.launcher import TritonServer
from backends.process_group import kv_segments
from planner.deployment import default_deployment
from planner.repository import write_repository

pytestmark = pytest.mark.e2e
NUM_BLOCKS = 256
STREAMS = 16


def parallel_repository(
    out: Path, model_dir: Path, prefill: tuple[int, int], decode: tuple[int, int]
) -> Path:
    """What `python -m planner.repository --prefill-tp --prefill-pp --decode-tp --decode-pp` writes
    for prefill (tp, pp) and decode (tp, pp)."""
    model = str(model_dir.resolve())
    write_repository(
        default_deployment(model, "cpu", NUM_BLOCKS, prefill[0], decode[0], prefill[1], decode[1]), out
    )
    # Short enough to keep the fault test quick, long enough that a loaded CI machine never trips it.
    set_parameter(out, "orchestrator", "decode_stall_timeout_seconds", "6")
    return out


def workers_of(repo: Path, model: str) -> list[int]:
    """The worker processes (ranks 1..) the model's stub (rank 0) started."""
    [stub] = stub_pids(repo, model)
    children = subprocess.run(["pgrep", "-P", str(stub)], capture_output=True, text=True, check=False).stdout
    return [
        int(p) for p in children.split() if "engine.parallel.worker" in Path(f"/proc/{p}/cmdline").read_text()
    ]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


CONFIGS = {  # prefill (tp, pp), decode (tp, pp)
    "prefill-tp2-decode-tp1": ((2, 1), (1, 1)),
    "prefill-tp1-decode-tp2": ((1, 1), (2, 1)),
    "prefill-pp2-decode-pp1": ((1, 2), (1, 1)),
    "prefill-pp1-decode-pp2": ((1, 1), (1, 2)),
}


@pytest.fixture(scope="module", params=list(CONFIGS.values()), ids=list(CONFIGS))
def server(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    prefill, decode = request.param
    work = tmp_path_factory.mktemp(f"parallel{prefill[0]}{prefill[1]}{decode[0]}{decode[1]}")
    srv = start_tritonserver(parallel_repository(work / "repo", tiny_model_dir, prefill, decode), work)
    yield srv
    srv.stop()


def kv_state(server: TritonServer) -> dict[str, float]:
    text = metrics(server.metrics_url)
    return {
        "prefill_free": sum(metric_values(text, "disagg_kv_free_blocks", model="prefill")),
        "decode_free": sum(metric_values(text, "disagg_kv_free_blocks", model="decode")),
        "leases": sum(metric_values(text, "disagg_kv_active_leases", model="prefill")),
    }


def test_streams_equal_colocated_and_free_every_block(server: TritonServer) -> None:
    requests = [
        client_inputs(f"Request {i}: the harbor town woke before the sun", 8 + 3 * i) for i in range(STREAMS)
    ]
    disagg = stream_many(server.grpc_url, "orchestrator", requests)
    coloc = stream_many(server.grpc_url, "colocated", requests)
    assert [r.error for r in disagg] == [None] * STREAMS
    assert [r.output_ids for r in disagg] == [r.output_ids for r in coloc]
    assert [len(r.output_ids) for r in disagg] == [8 + 3 * i for i in range(STREAMS)]
    idle = {"prefill_free": NUM_BLOCKS, "decode_free": NUM_BLOCKS, "leases": 0}
    deadline = time.monotonic() + 10
    while kv_state(server) != idle and time.monotonic() < deadline:
        time.sleep(0.2)  # the gauges follow the engine loops
    assert kv_state(server) == idle


def test_bad_request_is_refused_before_the_workers(server: TritonServer) -> None:
    repo = server.config.model_repository
    tp_model = "prefill" if workers_of(repo, "prefill") else "decode"
    before = workers_of(repo, tp_model)
    [bad] = stream_many(server.grpc_url, "orchestrator", [client_inputs("Hello", 100000)])
    assert bad.error is not None and "exceeds the context" in bad.error
    [ok] = stream_many(server.grpc_url, "orchestrator", [client_inputs("Hello", 4)])
    assert ok.error is None and len(ok.output_ids) == 4
    assert workers_of(repo, tp_model) == before and all(alive(p) for p in before)


def test_killed_worker_rank_gives_an_error_not_a_hang(server: TritonServer) -> None:
    """Last for each server: the instance stays out of service afterwards. A decode rank (or stage)
    killed mid-stream fails that stream; a prefill one killed fails the next request's prefill."""
    repo = server.config.model_repository
    tp_model = "prefill" if workers_of(repo, "prefill") else "decode"
    [worker] = workers_of(repo, tp_model)
    responses: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result=None, error=None: responses.put((result, error)))
    client.async_stream_infer("orchestrator", client_inputs("Once upon a time", 1500))
    for _ in range(3):  # streaming
        _, error = responses.get(timeout=60)
        assert error is None
    started = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    if tp_model == "decode":
        error = None
        while error is None:
            result, error = responses.get(timeout=30)  # a hang fails here
            final = (
                result is not None and result.get_response().parameters["triton_final_response"].bool_param
            )
            assert not final, "the stream ended normally although a decode rank was killed"
        message = str(error)
    else:
        [failed] = stream_many(server.grpc_url, "orchestrator", [client_inputs("Hello again", 8)], timeout=30)
        message = str(failed.error)
    assert time.monotonic() - started < 30, "within the stall timeout (6 s) plus slack for a loaded machine"
    assert f"{tp_model} instance out of service" in message or "failed" in message, message
    client.stop_stream(cancel_requests=True)
    client.close()
    # The instance refuses what comes next, by name; the rest of the server still serves.
    deadline = time.monotonic() + 10
    while True:
        [refused] = stream_many(server.grpc_url, "orchestrator", [client_inputs("Hello", 4)], timeout=60)
        if (refused.error is not None and "out of service" in refused.error) or time.monotonic() > deadline:
            break
    assert refused.error is not None and f"{tp_model} instance out of service:" in refused.error
    assert "rank 1" in refused.error and "exited with code -9" in refused.error
    [coloc] = stream_many(server.grpc_url, "colocated", [client_inputs("Hello", 4)], timeout=60)
    assert coloc.error is None and len(coloc.output_ids) == 4


def test_stopping_the_server_leaves_no_worker_and_no_segment(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("parallelstop")
    repo = parallel_repository(work / "repo", tiny_model_dir, (2, 1), (1, 2))
    server = start_tritonserver(repo, work)
    try:
        pgid = server.pid
        workers = workers_of(repo, "prefill") + workers_of(repo, "decode")
        assert len(workers) == 2 and all(alive(p) for p in workers)
        # Prefill: both ranks' pools (decode instances read them); decode: both stages' (rank 0
        # pulls into them).
        assert len(kv_segments(pgid)) == 4
        [ok] = stream_many(server.grpc_url, "orchestrator", [client_inputs("Hello", 6)])
        assert ok.error is None
    finally:
        server.stop()
    assert not any(alive(p) for p in workers)
    assert kv_segments(pgid) == []


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one per rank)")
def test_cuda_prefill_tp2_to_decode_tp1_equals_colocated(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On CUDA: NCCL between the ranks, each rank's pool on its GPU (opened over CUDA IPC),
    cuda_ipc KV transfer pulling each decode rank's heads."""
    work = tmp_path_factory.mktemp("cudatp")
    dep = default_deployment(str(tiny_model_dir.resolve()), "cuda", NUM_BLOCKS, prefill_tp=2, decode_tp=1)
    write_repository(dep, work / "repo")
    server = start_tritonserver(work / "repo", work)
    try:
        requests = [client_inputs(f"Request {i} on the GPU", 12) for i in range(8)]
        disagg = stream_many(server.grpc_url, "orchestrator", requests)
        coloc = stream_many(server.grpc_url, "colocated", requests)
        assert [r.error for r in disagg] == [None] * 8
        assert [r.output_ids for r in disagg] == [r.output_ids for r in coloc]
    finally:
        server.stop()
