"""Faults on a real tritonserver: a cancelled request and a client that disconnects free their KV
blocks (visible in the metrics); a decode process killed mid-stream gives an error, not a hang."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from serving import (
    client_inputs,
    metric_values,
    metrics,
    set_parameter,
    stream_many,
    stub_pids,
    write_repository,
)
from tritonserver_fixture import start_tritonserver

from backends.launcher import TritonServer

pytestmark = pytest.mark.e2e
NUM_BLOCKS = 256
LONG = 1500  # tokens: seconds of decoding, so there is time to interrupt it


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("faults")
    repo = write_repository(work / "repo", tiny_model_dir, num_blocks=NUM_BLOCKS)
    # Short enough to keep the test quick, long enough that a loaded CI machine never trips it.
    set_parameter(repo, "orchestrator", "decode_stall_timeout_seconds", "6")
    srv = start_tritonserver(repo, work)
    yield srv
    srv.stop()


def _decode_state(server: TritonServer) -> tuple[float, float]:
    text = metrics(server.metrics_url)
    free = sum(metric_values(text, "disagg_kv_free_blocks", model="decode"))
    cancelled = sum(metric_values(text, "disagg_cancelled_total", model="decode"))
    return free, cancelled


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _start_long_stream(url: str) -> tuple[grpcclient.InferenceServerClient, queue.Queue[Any]]:
    responses: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result=None, error=None: responses.put((result, error)))
    client.async_stream_infer("orchestrator", client_inputs("Once upon a time", LONG), request_id="long")
    for _ in range(5):  # decoding has started
        _, error = responses.get(timeout=60)
        assert error is None
    return client, responses


def test_cancelled_request_frees_its_blocks(server: TritonServer) -> None:
    _, cancelled_before = _decode_state(server)
    client, _ = _start_long_stream(server.grpc_url)
    assert _wait_for(lambda: _decode_state(server)[0] < NUM_BLOCKS, 10), "the sequence holds decode blocks"
    client.stop_stream(cancel_requests=True)
    client.close()
    assert _wait_for(lambda: _decode_state(server) == (NUM_BLOCKS, cancelled_before + 1), 10), _decode_state(
        server
    )


CLIENT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import tritonclient.grpc as g
    got, errors = [], []
    c = g.InferenceServerClient(sys.argv[1])
    c.start_stream(callback=lambda result=None, error=None: (errors if error is not None else got).append(error))
    inputs = []
    for name, arr in {"text_input": np.array([b"Once upon a time"], dtype=object),
                      "max_tokens": np.array([int(sys.argv[2])], dtype=np.int32), "stream": np.array([True])}.items():
        i = g.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object else g.np_to_triton_dtype(arr.dtype))
        i.set_data_from_numpy(arr)
        inputs.append(i)
    c.async_stream_infer("orchestrator", inputs)
    deadline = time.monotonic() + 120
    while len(got) < 5 and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    print("streaming" if len(got) >= 5 else f"failed: {errors}", flush=True)
    time.sleep(600)
    """
)


def test_client_that_disconnects_frees_its_blocks(server: TritonServer) -> None:
    _, cancelled_before = _decode_state(server)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, server.grpc_url, str(LONG)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "streaming"
        assert _decode_state(server)[0] < NUM_BLOCKS
        os.kill(proc.pid, signal.SIGKILL)  # no goodbye: the connection just drops
    finally:
        proc.kill()
        proc.wait()
    assert _wait_for(lambda: _decode_state(server) == (NUM_BLOCKS, cancelled_before + 1), 15), _decode_state(
        server
    )


def test_killed_decode_process_gives_an_error_not_a_hang(server: TritonServer) -> None:
    # Last in this module: the decode model stays dead afterwards.
    failed_before = sum(
        metric_values(metrics(server.metrics_url), "disagg_request_failures_total", model="orchestrator")
    )
    client, responses = _start_long_stream(server.grpc_url)
    [pid] = stub_pids(server.config.model_repository, "decode")
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    error = None
    while error is None:
        result, error = responses.get(timeout=30)  # a hang fails here
        if result is not None and result.get_response().parameters["triton_final_response"].bool_param:
            pytest.fail("the stream ended normally although decode was killed")
    assert time.monotonic() - started < 30  # the stall timeout (6 s) plus slack for a loaded machine
    client.stop_stream(cancel_requests=True)
    client.close()
    if not server.is_running():
        # tritonserver 2.51 itself aborts now and then when a stub dies holding a shared-memory
        # mutex (docs/triton-python-backend.md, section 4): nothing a model can prevent. Anything
        # else taking the server down is a failure.
        assert "boost::interprocess::lock_exception" in server.log_path.read_text(errors="replace")
        return
    assert "decode" in str(error)
    # The server still serves: the orchestrator answers (an error: its decode is gone), colocated works.
    [disagg] = stream_many(server.grpc_url, "orchestrator", [client_inputs("Hello", 4)], timeout=60)
    [coloc] = stream_many(server.grpc_url, "colocated", [client_inputs("Hello", 4)], timeout=60)
    assert disagg.error is not None and coloc.error is None and len(coloc.output_ids) == 4
    # Both failed after they were accepted (execute() had returned): Triton 2.51 counts them as
    # successes; our counter has them.
    failed = sum(
        metric_values(metrics(server.metrics_url), "disagg_request_failures_total", model="orchestrator")
    )
    assert failed == failed_before + 2


def test_pool_of_a_killed_server_is_removed_by_the_launcher(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A prefill that dies alone has its segment unlinked by Python's resource tracker; when the
    # whole server is killed (tracker included), the launcher removes what is left.
    from backends.process_group import kv_segments, signal_group

    work = tmp_path_factory.mktemp("killed")
    server = start_tritonserver(write_repository(work / "repo", tiny_model_dir, num_blocks=NUM_BLOCKS), work)
    try:
        pgid = server.pid  # the launcher starts the server as its own process-group leader
        assert len(kv_segments(pgid)) == 1, "the prefill instance's KV pool is a named segment"
        signal_group(pgid, signal.SIGKILL)
        time.sleep(0.5)
        assert len(kv_segments(pgid)) == 1, "nothing ran to unlink it"
    finally:
        server.stop()
    assert kv_segments(pgid) == []
