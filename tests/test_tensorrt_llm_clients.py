"""What TensorRT-LLM's own clients send, against the generated repository on a real tritonserver:
the `ensemble` and `tensorrt_llm_bls` entry points with [1, 1] tensors (end_to_end_grpc_client.py's
requests, rewritten here) and the README's curl request to /generate."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving import (
    client_inputs,
    infer_inputs,
    metric_values,
    metrics,
    set_parameter,
    stream_many,
    write_repository,
)
from tritonserver_fixture import start_tritonserver

from backends.launcher import TritonServer

pytestmark = pytest.mark.e2e
PROMPT = "What is machine learning?"
ENTRY_POINTS = ("ensemble", "tensorrt_llm_bls")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("trtllm")
    repo = write_repository(work / "repo", tiny_model_dir, tensorrt_llm_entry_points=ENTRY_POINTS)
    # This entry point reaches prefill and decode by BLS calls through the server, the others over
    # the phases' request channels (the default): the tests below compare them token for token.
    set_parameter(repo, "tensorrt_llm_bls", "phase_requests", "bls")
    srv = start_tritonserver(repo, work)
    yield srv
    srv.stop()


def batch_inputs(
    text: str, max_tokens: int, stream: bool, **extra: np.ndarray
) -> list[grpcclient.InferInput]:
    """end_to_end_grpc_client.py's tensors: every input [1, 1] (a batch of one), strings as BYTES."""
    arrays = {
        "text_input": np.array([[text.encode()]], dtype=object),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
        "bad_words": np.array([[b""]], dtype=object),
        "stop_words": np.array([[b""]], dtype=object),
        "exclude_input_in_output": np.array([[True]]),
        "beam_width": np.array([[1]], dtype=np.int32),
        "stream": np.array([[stream]]),
        **extra,
    }
    return infer_inputs(arrays)


@pytest.mark.parametrize("model", ENTRY_POINTS)
def test_streaming_with_batch_tensors_equals_the_orchestrator(server: TritonServer, model: str) -> None:
    def prefill_calls() -> float:  # BLS calls prefill answered (Triton counts requests it routed)
        return sum(
            metric_values(metrics(server.metrics_url), "nv_inference_request_success", model="prefill")
        )

    before = prefill_calls()
    reference = stream_many(server.grpc_url, "orchestrator", [client_inputs(PROMPT, 12)])  # shapes [1]
    assert prefill_calls() == before  # over the request channel: not through the server
    [got] = stream_many(server.grpc_url, model, [batch_inputs(PROMPT, 12, True)])
    assert prefill_calls() == before + (model == "tensorrt_llm_bls")
    assert got.error is None and got.output_ids == reference[0].output_ids and got.text == reference[0].text
    assert got.finish_reason == "length" and got.responses >= 2
    logged = stream_many(
        server.grpc_url, model, [batch_inputs(PROMPT, 12, True, return_log_probs=np.array([[True]]))]
    )[0]
    assert logged.output_ids == got.output_ids and len(logged.log_probs) == 12
    assert logged.cum_log_probs == pytest.approx(sum(logged.log_probs), abs=1e-3)


def test_prompt_in_output_unless_excluded(server: TritonServer) -> None:
    """TensorRT-LLM's default (exclude_input_in_output absent or false) puts the prompt before a
    non-streaming output; true leaves it out."""
    [excluded] = stream_many(server.grpc_url, "ensemble", [batch_inputs(PROMPT, 8, False)])
    included = stream_many(
        server.grpc_url, "ensemble",
        [batch_inputs(PROMPT, 8, False, exclude_input_in_output=np.array([[False]]))],
    )[0]  # fmt: skip
    assert excluded.error is None and included.error is None
    assert included.text == PROMPT + excluded.text
    assert included.output_ids[-8:] == excluded.output_ids and len(included.output_ids) > 8


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"beam_width": np.array([[2]], dtype=np.int32)}, "beam_width must be 1"),
        ({"num_return_sequences": np.array([[3]], dtype=np.int32)}, "num_return_sequences must be 1"),
    ],
)
def test_options_with_another_value_are_refused_by_name(
    server: TritonServer, extra: dict[str, np.ndarray], message: str
) -> None:
    [got] = stream_many(server.grpc_url, "tensorrt_llm_bls", [batch_inputs(PROMPT, 4, True, **extra)])
    assert got.error is not None and message in got.error


def test_bad_words_are_never_produced(server: TritonServer, tiny_model_dir: Path) -> None:
    """Two words of the free output as bad words: neither comes back, and orchestrator and
    colocated agree token for token."""
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    [free] = stream_many(server.grpc_url, "orchestrator", [client_inputs(PROMPT, 16)])
    # words whose text tokenizes back to exactly their one token
    banned = [t for t in free.output_ids if tok(tok.decode([t]), add_special_tokens=False).input_ids == [t]][
        :2
    ]
    assert banned, "no re-tokenizable token in the output"
    words = np.array([[tok.decode([t]).encode() for t in banned]], dtype=object)
    [got] = stream_many(server.grpc_url, "ensemble", [batch_inputs(PROMPT, 16, True, bad_words=words)])
    flat = np.array([w for w in words[0]], dtype=object)
    [coloc] = stream_many(server.grpc_url, "colocated", [client_inputs(PROMPT, 16, bad_words=flat)])
    assert got.error is None and got.output_ids == coloc.output_ids != free.output_ids
    assert not set(banned) & set(got.output_ids)


def test_unknown_http_keys_are_refused_by_name(server: TritonServer) -> None:
    """/generate turns a JSON key that is no input into a request parameter: it is refused, not
    dropped (TensorRT-LLM's `seed` is an input here)."""
    for model in ("ensemble", "orchestrator", "colocated"):
        body = {"text_input": PROMPT, "max_tokens": 4, "frobnicate": 1}
        req = urllib.request.Request(
            f"{server.http_url}/v2/models/{model}/generate", data=json.dumps(body).encode(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert "unknown input or option 'frobnicate'" in err.value.read().decode(), model
    seeded = []
    for _ in range(2):
        body = {"text_input": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 42}
        req = urllib.request.Request(
            f"{server.http_url}/v2/models/ensemble/generate", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            seeded.append(json.loads(resp.read())["output_ids"])
    assert seeded[0] == seeded[1]  # `seed` is honoured: the same seed, the same sample


def test_readme_curl_request(server: TritonServer) -> None:
    body = {"text_input": PROMPT, "max_tokens": 20, "bad_words": "", "stop_words": ""}
    req = urllib.request.Request(
        f"{server.http_url}/v2/models/ensemble/generate", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, reply = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        status, reply = exc.code, json.loads(exc.read())
    assert status == 200, reply
    text = reply["text_output"]
    text = text[0] if isinstance(text, list) else text
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


@pytest.fixture(scope="module")
def unary_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A repository written as with --decoupled false: unary entry points."""
    work = tmp_path_factory.mktemp("trtllm-unary")
    repo = write_repository(
        work / "repo", tiny_model_dir, tensorrt_llm_entry_points=ENTRY_POINTS, decoupled=False
    )
    srv = start_tritonserver(repo, work)
    yield srv
    srv.stop()


def test_unary_grpc_and_http_infer_and_generate(unary_server: TritonServer, server: TritonServer) -> None:
    """gRPC ModelInfer, HTTP /infer and /generate against unary entry points give the streaming
    deployment's tokens; stream=true is refused by name."""
    [streamed] = stream_many(server.grpc_url, "orchestrator", [client_inputs(PROMPT, 10)])
    client = grpcclient.InferenceServerClient(unary_server.grpc_url)
    try:
        for model, inputs in (
            ("orchestrator", client_inputs(PROMPT, 10, stream=False)),
            ("ensemble", batch_inputs(PROMPT, 10, False)),
            ("tensorrt_llm_bls", batch_inputs(PROMPT, 10, False, return_log_probs=np.array([[True]]))),
        ):
            result = client.infer(model, inputs)
            assert result.as_numpy("output_ids").reshape(-1).tolist() == streamed.output_ids, model
            assert result.as_numpy("text_output").reshape(-1)[0].decode() == streamed.text
        assert result.as_numpy("output_log_probs").size == 10
        with pytest.raises(Exception, match="stream must be false"):
            client.infer("ensemble", batch_inputs(PROMPT, 4, True))
    finally:
        client.close()
    body = {"text_input": PROMPT, "max_tokens": 10, "exclude_input_in_output": True}
    for path in ("/v2/models/ensemble/generate", "/v2/models/orchestrator/generate"):
        req = urllib.request.Request(
            unary_server.http_url + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
        text = reply["text_output"]
        assert (text[0] if isinstance(text, list) else text) == streamed.text, path
    infer = {
        "inputs": [
            {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
            {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [10]},
            {"name": "exclude_input_in_output", "shape": [1, 1], "datatype": "BOOL", "data": [True]},
        ]
    }
    req = urllib.request.Request(
        unary_server.http_url + "/v2/models/ensemble/infer", data=json.dumps(infer).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        outputs = {o["name"]: o["data"] for o in json.loads(resp.read())["outputs"]}
    assert outputs["output_ids"] == streamed.output_ids and outputs["text_output"] == [streamed.text]


def _outcomes(server: TritonServer, model: str) -> tuple[float, float, float]:
    """Triton's own request counters of a model (successes, failures), and ours of failures."""
    text = metrics(server.metrics_url)
    return (
        sum(metric_values(text, "nv_inference_request_success", model=model)),
        sum(metric_values(text, "nv_inference_request_failure", model=model)),
        sum(metric_values(text, "disagg_request_failures_total", model=model)),
    )


def _generate(server: TritonServer, model: str, body: dict[str, object]) -> tuple[int, str]:
    req = urllib.request.Request(
        f"{server.http_url}/v2/models/{model}/generate", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("deployment", ["decoupled", "unary"])
def test_refused_requests_count_as_failures_in_tritons_metrics(
    server: TritonServer, unary_server: TritonServer, deployment: str
) -> None:
    """A refused request is an error response to its client and a failure in
    nv_inference_request_failure; a good request after it is served and counted a success."""
    srv = server if deployment == "decoupled" else unary_server
    models = ("ensemble", "orchestrator") + (("colocated",) if deployment == "decoupled" else ())
    for model in models:
        ok_before, failed_before, ours_before = _outcomes(srv, model)
        status, reply = _generate(srv, model, {"text_input": PROMPT, "max_tokens": 4, "beam_width": 2})
        assert status == 400 and "beam_width must be 1" in reply, (model, reply)
        status, reply = _generate(srv, model, {"text_input": PROMPT, "max_tokens": 4})
        assert status == 200, (model, reply)
        assert _outcomes(srv, model) == (ok_before + 1, failed_before + 1, ours_before + 1), model


def test_perf_metrics_and_indexes_in_the_final_response(server: TritonServer) -> None:
    """return_perf_metrics: times in order and within the request's wall-clock span, and the KV
    blocks the sequence held; batch_index and sequence_index are 0; without it, no times."""
    blocks = {}
    for model in ("ensemble", "orchestrator", "colocated"):
        body = {"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True, "return_perf_metrics": True}
        start = time.time_ns()
        status, reply = _generate(server, model, body)
        end = time.time_ns()
        assert status == 200, reply
        out = {k: (v[0] if isinstance(v, list) else v) for k, v in json.loads(reply).items()}
        times = [out[f"{k}_time_ns"] for k in ("arrival", "first_scheduled", "first_token", "last_token")]
        assert start <= times[0] <= times[1] <= times[2] <= times[3] <= end, (model, times)
        assert out["batch_index"] == out["sequence_index"] == out["kv_cache_reused_blocks"] == 0
        assert out["kv_cache_alloc_new_blocks"] == out["kv_cache_alloc_total_blocks"] > 0
        blocks[model] = out["kv_cache_alloc_total_blocks"]
        status, reply = _generate(server, model, {"text_input": PROMPT, "max_tokens": 2})
        assert status == 200 and "arrival_time_ns" not in reply and '"batch_index":0' in reply, reply
    # Disaggregated, the blocks are the decode instance's: the same as the colocated engine's.
    assert len(set(blocks.values())) == 1, blocks


UNSUPPORTED = {  # TensorRT-LLM's inputs for what this server does not do, with their shapes there
    "lora_task_id": np.array([[1]], dtype=np.uint64),
    "prompt_embedding_table": np.zeros((1, 2, 4), dtype=np.float16),
    "guided_decoding_guide_type": np.array([[b"json"]], dtype=object),
    "num_draft_tokens": np.array([[2]], dtype=np.int32),
    "image_url_input": np.array([[b"http://127.0.0.1/x.png"]], dtype=object),
    "return_context_logits": np.array([[True]]),
    "length_penalty": np.array([[1.0]], dtype=np.float32),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_tensorrt_llm_inputs_are_refused_by_name(server: TritonServer, name: str) -> None:
    """Over gRPC Triton refuses an input the entry point does not declare, naming it; over HTTP
    /generate it arrives as a parameter, which the model refuses by name. Nothing is ignored."""
    [got] = stream_many(
        server.grpc_url, "ensemble", [batch_inputs(PROMPT, 4, True, **{name: UNSUPPORTED[name]})]
    )
    assert got.error is not None and name in got.error, got.error
    status, reply = _generate(server, "ensemble", {"text_input": PROMPT, "max_tokens": 4, name: 1})
    assert status == 400 and f"unknown input or option {name!r}" in reply, reply
