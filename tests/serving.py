"""Helpers for end-to-end tests: a model repository for the default model, streaming gRPC calls,
and reading Triton's Prometheus metrics."""

from __future__ import annotations

import dataclasses
import queue
import re
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tritonclient.grpc as grpcclient


def write_repository(
    out: Path,
    model_dir: Path,
    tensorrt_llm_entry_points: tuple[str, ...] = (),
    decoupled: bool = True,
    **engine_overrides: Any,
) -> Path:
    """The default deployment (prefill, decode, colocated, orchestrator on CPU) for model_dir,
    written by the project's generator, with engine parameters overridden for a test. The
    TensorRT-LLM entry points (two more orchestrator processes) only where a test asks for them;
    decoupled=False writes the entry points unary, as --decoupled false does."""
    from planner.deployment import default_deployment
    from planner.repository import write_repository as write

    dep = default_deployment(str(model_dir.resolve()))
    engine_overrides.setdefault("num_threads", 1)  # four model processes share two cores

    def tuned(rep: Any) -> Any:
        return dataclasses.replace(rep, engine=dataclasses.replace(rep.engine, **engine_overrides))

    assert dep.colocated is not None
    dep = dataclasses.replace(
        dep,
        tensorrt_llm_entry_points=tensorrt_llm_entry_points,
        decoupled=decoupled,
        prefill=tuple(tuned(r) for r in dep.prefill),
        decode=tuple(tuned(r) for r in dep.decode),
        colocated=tuned(dep.colocated),
    )
    write(dep, out)
    return out


class StreamResult(NamedTuple):
    output_ids: list[int]
    text: str
    finish_reason: str
    responses: int
    error: str | None
    log_probs: tuple[float, ...] = ()  # output_log_probs of every response (with return_log_probs)
    cum_log_probs: float | None = None  # the last response's


def client_inputs(
    text: str | None = None, max_tokens: int = 16, stream: bool = True, **extra: np.ndarray
) -> list[grpcclient.InferInput]:
    arrays: dict[str, np.ndarray] = {
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "stream": np.array([stream]),
    }
    if text is not None:
        arrays["text_input"] = np.array([text.encode()], dtype=object)
    arrays.update(extra)
    return infer_inputs(arrays)


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """gRPC inputs of these arrays, with their shapes as they are (object arrays as BYTES)."""
    inputs = []
    for name, arr in arrays.items():
        dtype = "BYTES" if arr.dtype == object else grpcclient.np_to_triton_dtype(arr.dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def stream_many(
    url: str, model: str, requests: list[list[grpcclient.InferInput]], timeout: float = 120.0
) -> list[StreamResult]:
    """Sends all requests at once on one gRPC stream; returns each one's collected responses."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result=None, error=None: results.put((result, error)))
    state: dict[str, dict[str, Any]] = {}
    ok = False
    try:
        for i, inputs in enumerate(requests):
            state[str(i)] = {"ids": [], "text": "", "reason": "", "n": 0, "error": None, "done": False,
                             "log_probs": [], "cum": None}  # fmt: skip
            client.async_stream_infer(model, inputs, request_id=str(i), enable_empty_final_response=True)
        while not all(s["done"] for s in state.values()):
            result, error = results.get(timeout=timeout)
            if error is not None:
                rid = _request_id_of_error(error, state)
                state[rid]["error"], state[rid]["done"] = str(error), True
                continue
            s = state[result.get_response().id]
            ids = result.as_numpy("output_ids")
            if ids is not None:
                s["ids"] += ids.reshape(-1).tolist()
                s["text"] += result.as_numpy("text_output").reshape(-1)[0].decode()
                s["reason"] = result.as_numpy("finish_reason").reshape(-1)[0].decode() or s["reason"]
                s["n"] += 1
                log_probs, cum = result.as_numpy("output_log_probs"), result.as_numpy("cum_log_probs")
                if log_probs is not None:
                    s["log_probs"] += log_probs.reshape(-1).tolist()
                if cum is not None:
                    s["cum"] = float(cum.reshape(-1)[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                s["done"] = True
        ok = True
    finally:
        # After a failure, cancel what is still open: a plain stop waits for every request to end.
        client.stop_stream(cancel_requests=not ok)
        client.close()
    return [
        StreamResult(s["ids"], s["text"], s["reason"], s["n"], s["error"], tuple(s["log_probs"]), s["cum"])
        for s in state.values()
    ]


def _request_id_of_error(error: Any, state: dict[str, dict[str, Any]]) -> str:
    # Errors on a gRPC stream do not carry the request id: attribute to the oldest open request
    # only when a test sends one failing request at a time.
    open_ids = [rid for rid, s in state.items() if not s["done"]]
    return open_ids[0]


def metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def metric_values(text: str, name: str, **labels: str) -> list[float]:
    values = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            values.append(float(m.group(2)))
    return values


def set_parameter(repo: Path, model: str, key: str, value: str) -> None:
    """Sets one string parameter in a generated config.pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = repo / model / "config.pbtxt"
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    cfg.parameters[key].string_value = value
    path.write_text(text_format.MessageToString(cfg))


def stub_pids(repo: Path, model: str) -> list[int]:
    """Python-backend stub processes running `model` of this repository (the path is unique to a test)."""
    import subprocess

    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
    script = f"{repo.resolve()}/{model}/1/model.py"
    return [
        int(line.split(None, 1)[0])
        for line in out.splitlines()[1:]
        if "triton_python_backend_stub" in line and script in line
    ]
