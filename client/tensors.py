"""Request tensors and response parsing shared by the gRPC and HTTP clients.

The names and types are those of backends/message/specs.py (CLIENT_INPUTS, CLIENT_OUTPUTS).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from client.api import GenerateResult, Prompt, SamplingParams, ServerError, check_prompt


def request_arrays(prompt: Prompt, params: SamplingParams, stream: bool) -> dict[str, np.ndarray]:
    """The request as named numpy arrays; optional inputs are left out when unset (the server's
    defaults apply: greedy, no top-k/top-p, model EOS)."""
    check_prompt(prompt)
    arrays: dict[str, np.ndarray] = {}
    if isinstance(prompt, str):
        arrays["text_input"] = np.array([prompt.encode()], dtype=object)
    else:
        arrays["input_ids"] = np.array(list(prompt), dtype=np.int32)
    arrays["max_tokens"] = np.array([params.max_tokens], dtype=np.int32)
    arrays["stream"] = np.array([stream], dtype=bool)
    if params.temperature is not None:
        arrays["temperature"] = np.array([params.temperature], dtype=np.float32)
    if params.top_k is not None:
        arrays["top_k"] = np.array([params.top_k], dtype=np.int32)
    if params.top_p is not None:
        arrays["top_p"] = np.array([params.top_p], dtype=np.float32)
    if params.seed is not None:
        arrays["random_seed"] = np.array([params.seed], dtype=np.uint64)
    if params.end_id is not None:
        arrays["end_id"] = np.array([params.end_id], dtype=np.int32)
    if params.stop:
        arrays["stop_words"] = np.array([s.encode() for s in params.stop], dtype=object)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(params, name) is not None:
            arrays[name] = np.array([getattr(params, name)], dtype=np.float32)
    if params.min_tokens is not None:
        arrays["min_tokens"] = np.array([params.min_tokens], dtype=np.int32)
    if params.ignore_eos:
        arrays["ignore_eos"] = np.array([True], dtype=bool)
    if params.logprobs:
        arrays["return_log_probs"] = np.array([True], dtype=bool)
    return arrays


def grpc_inputs(prompt: Prompt, params: SamplingParams, stream: bool) -> list[Any]:
    """tritonclient.grpc InferInput objects for the request."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, arr in request_arrays(prompt, params, stream).items():
        dtype = "BYTES" if arr.dtype == object else grpcclient.np_to_triton_dtype(arr.dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def http_body(prompt: Prompt, params: SamplingParams, stream: bool) -> dict[str, Any]:
    """JSON body for Triton's /generate and /generate_stream (one key per input; a one-element
    tensor may be given as a scalar)."""
    body: dict[str, Any] = {}
    for name, arr in request_arrays(prompt, params, stream).items():
        values = [v.decode() if isinstance(v, bytes) else v.item() for v in arr.reshape(-1)]
        body[name] = values if name in ("input_ids", "stop_words") else values[0]
    return body


def parse_grpc_result(result: Any) -> tuple[str, tuple[int, ...], str | None, tuple[float, ...]] | None:
    """(text, token ids, finish reason or None, log-probabilities) of one gRPC response; None for
    an empty final one."""
    ids = result.as_numpy("output_ids")
    if ids is None:
        return None
    text_arr = result.as_numpy("text_output")
    reason_arr = result.as_numpy("finish_reason")
    log_probs = result.as_numpy("output_log_probs")
    text = _decode(text_arr.reshape(-1)[0]) if text_arr is not None and text_arr.size else ""
    reason = _decode(reason_arr.reshape(-1)[0]) if reason_arr is not None and reason_arr.size else ""
    lps = () if log_probs is None else tuple(float(x) for x in log_probs.reshape(-1))
    return text, tuple(int(t) for t in ids.reshape(-1)), reason or None, lps


def parse_http_event(event: dict[str, Any]) -> tuple[str, tuple[int, ...], str | None, tuple[float, ...]]:
    """(text, token ids, finish reason or None, log-probabilities) of one /generate(_stream) JSON
    response. Triton writes a one-element tensor as a scalar, so lists and scalars are both accepted."""
    ids = event.get("output_ids", [])
    ids_list = ids if isinstance(ids, list) else [ids]
    text = event.get("text_output", "")
    reason = event.get("finish_reason", "")
    if isinstance(text, list):
        text = "".join(str(t) for t in text)
    if isinstance(reason, list):
        reason = reason[0] if reason else ""
    lps = event.get("output_log_probs", [])
    lps_list = lps if isinstance(lps, list) else [lps]
    return (
        str(text),
        tuple(int(t) for t in ids_list),
        (str(reason) or None),
        tuple(float(x) for x in lps_list),
    )


def _decode(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def http_result(event: dict[str, Any], model: str, start: float) -> GenerateResult:
    """The GenerateResult of a /generate reply (ServerError if it carries an error)."""
    if "error" in event:
        raise ServerError(str(event["error"]), model)
    text, ids, reason, _ = parse_http_event(event)
    return GenerateResult(text, ids, reason or "", time.perf_counter() - start)
