"""The typed messages between the phases (backends/message): every message round-trips through
the tensors its specs describe, and malformed tensors are refused with the input named."""

from __future__ import annotations

import numpy as np
import pytest

from backends.message import (
    MODEL_INTERFACES,
    ClientChunk,
    ClientInputs,
    DecodeCancel,
    DecodeChunk,
    DecodeRequest,
    InbandError,
    Message,
    PrefillRequest,
    PrefillResult,
    read_decode_input,
)
from engine.errors import RequestError
from engine.sampling import SamplingParams

EXAMPLES: list[Message] = [
    PrefillRequest(
        input_ids=(1, 2, 3), max_tokens=4, temperature=0.5, top_k=3, top_p=0.75, random_seed=2**63
    ),
    PrefillResult(first_token=7, kv_handle=b"\x00{json}\xff", finish_reason=""),
    PrefillResult(first_token=7, first_scheduled_time_ns=2**62, first_token_time_ns=2**62 + 1, kv_blocks=2),
    DecodeRequest(input_ids=(1, 2), first_token=9, kv_handle=b"h", request_id="r1", max_tokens=8, end_id=2),
    DecodeCancel(request_id="r1"),
    DecodeChunk(output_ids=(4, 5), finish_reason="length"),
    DecodeChunk(output_ids=(4,), finish_reason="length", last_token_time_ns=2**62 + 5, kv_blocks=3),
    DecodeChunk(),
    InbandError(error_message="KV transfer failed: ünïcode"),
    ClientChunk(text_output="Hé", output_ids=(1,), finish_reason="stop"),
    ClientChunk(
        text_output="",
        output_ids=(),
        finish_reason="length",
        batch_index=0,
        sequence_index=0,
        kv_cache_alloc_new_blocks=2,
        kv_cache_reused_blocks=0,
        kv_cache_alloc_total_blocks=2,
        arrival_time_ns=2**62,
        first_scheduled_time_ns=2**62 + 1,
        first_token_time_ns=2**62 + 2,
        last_token_time_ns=2**62 + 3,
    ),
    ClientInputs(text_input="hello", max_tokens=3, stream=True, stop_words=("a", "bc")),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_the_specs(message: Message) -> None:
    tensors = message.to_tensors()
    specs = {s.name: s for s in type(message).SPECS}
    assert set(tensors) <= set(specs)
    for name, arr in tensors.items():
        assert arr.ndim == 1 and (specs[name].dims == (-1,) or arr.shape == (1,)), name
    assert type(message).from_tensors(tensors) == message


def test_message_specs_are_the_models_interfaces() -> None:
    inputs = {role: {s.name: s for s in specs[0]} for role, specs in MODEL_INTERFACES.items()}
    outputs = {role: {s.name: s for s in specs[1]} for role, specs in MODEL_INTERFACES.items()}
    for cls, table, role in [
        (PrefillRequest, inputs, "prefill"),
        (PrefillResult, outputs, "prefill"),
        (DecodeRequest, inputs, "decode"),
        (DecodeCancel, inputs, "decode"),
        (DecodeChunk, outputs, "decode"),
        (ClientInputs, inputs, "orchestrator"),
        (ClientChunk, outputs, "colocated"),
    ]:
        for spec in cls.SPECS:
            assert table[role][spec.name][:3] == spec[:3], (cls.__name__, spec.name)


def test_sampling_round_trips_through_the_phases() -> None:
    params = SamplingParams(
        max_tokens=5, temperature=0.7, top_k=4, top_p=0.8, stop_token_ids=(3,), ignore_eos=True
    )
    sent = PrefillRequest(input_ids=(1,), **PrefillRequest.fields_of(params, 11))  # type: ignore[arg-type]
    got = PrefillRequest.from_tensors(sent.to_tensors()).sampling_params()
    # FP32 on the wire, as TensorRT-LLM's tensors are.
    assert (got.temperature, got.top_p) == pytest.approx((0.7, 0.8))
    assert (got.max_tokens, got.top_k, got.seed, got.stop_token_ids, got.ignore_eos) == (5, 4, 11, (3,), True)


def test_top_k_and_top_p_zero_mean_off_and_both_greedy_as_in_tensorrt_llm() -> None:
    def params(**kw: float) -> tuple[float, int, float]:
        p = PrefillRequest(input_ids=(1,), max_tokens=2, temperature=0.9, **kw).sampling_params()  # type: ignore[arg-type]
        return p.temperature, p.top_k, p.top_p

    assert params(top_k=0, top_p=0.0) == (0.0, 0, 1.0)  # greedy search
    assert params(top_p=0.0) == (0.0, 0, 1.0)
    assert params(top_k=5, top_p=0.0) == pytest.approx((0.9, 5, 1.0))  # top-k alone
    assert params(top_k=0, top_p=0.5) == pytest.approx((0.9, 0, 0.5))  # top-p alone


def test_decode_input_kinds_are_told_by_the_cancel_tag() -> None:
    cancel = read_decode_input(DecodeCancel(request_id="abc").to_tensors())
    assert cancel == DecodeCancel(request_id="abc")
    request = DecodeRequest(input_ids=(1,), first_token=2, kv_handle=b"h", max_tokens=3)
    assert read_decode_input({**request.to_tensors(), "cancel": np.array([False])}) == request
    with pytest.raises(RequestError, match="cancel request needs the request_id"):
        read_decode_input({"cancel": np.array([True])})
    with pytest.raises(RequestError, match="missing required input 'kv_handle'"):
        read_decode_input({k: v for k, v in request.to_tensors().items() if k != "kv_handle"})


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"max_tokens": np.array([1, 2], np.int32)}, "'max_tokens' must hold exactly one value"),
        ({"max_tokens": np.array([1.5], np.float32)}, "'max_tokens' must be an integer"),
        (
            {"max_tokens": np.array([1], np.int32), "temperature": np.array([b"x"], dtype=object)},
            "'temperature' must be a number",
        ),
        (
            {"max_tokens": np.array([1], np.int32), "input_ids": np.array([1.0], np.float32)},
            "'input_ids' must be integer token ids",
        ),
        (
            {"max_tokens": np.array([1], np.int32), "text_input": np.array([b"\xff"], dtype=object)},
            "'text_input' is not valid UTF-8",
        ),
        ({"text_input": np.array([b"hi"], dtype=object)}, "missing required input 'max_tokens'"),
    ],
)
def test_malformed_tensors_are_refused_by_name(tensors: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        ClientInputs.from_tensors(tensors)


def test_inband_error_is_found_only_in_error_responses() -> None:
    assert InbandError.find(DecodeChunk(output_ids=(1,)).to_tensors()) is None
    assert InbandError.find(InbandError(error_message="boom").to_tensors()) == InbandError(
        error_message="boom"
    )
    assert InbandError.find({"finish_reason": np.array([b"error"], dtype=object)}) == InbandError(
        error_message="unknown error"
    )


def test_chunks_merge_in_stream_order() -> None:
    merged = DecodeChunk(output_ids=(1,)).merge(DecodeChunk(output_ids=(2, 3), finish_reason="stop"))
    assert merged == DecodeChunk(output_ids=(1, 2, 3), finish_reason="stop")
    assert DecodeChunk().is_heartbeat and not merged.is_heartbeat
