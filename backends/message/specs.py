"""Tensor interface of each Triton model, as data: the one contract between the phases.

The client-facing names (orchestrator and colocated) are those of the TensorRT-LLM backend's
ensemble, so existing clients work unchanged. The repository generator writes config.pbtxt from
these specs, and the typed messages of this package (to_tensors / from_tensors) are derived from
them: a name, type or shape changed here changes both the writer and every reader.
"""

from __future__ import annotations

from typing import NamedTuple


class TensorSpec(NamedTuple):
    """One input or output tensor of a model (max_batch_size 0: dims are the whole shape)."""

    name: str
    data_type: str  # config.pbtxt DataType name, e.g. "TYPE_INT32"
    dims: tuple[int, ...]
    optional: bool = False


SAMPLING_INPUTS = (
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("random_seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("end_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("presence_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("min_tokens", "TYPE_INT32", (1,), optional=True),
    TensorSpec("return_log_probs", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("ignore_eos", "TYPE_BOOL", (1,), optional=True),  # vLLM's option: the model's EOS does not end
    # Bad words as token ids: the words' ids one after the other, and each word's length.
    TensorSpec("bad_word_ids", "TYPE_INT32", (-1,), optional=True),
    TensorSpec("bad_word_lens", "TYPE_INT32", (-1,), optional=True),
)

CLIENT_INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,), optional=True),
    TensorSpec("input_ids", "TYPE_INT32", (-1,), optional=True),
    *SAMPLING_INPUTS,
    TensorSpec("stream", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("seed", "TYPE_UINT64", (1,), optional=True),  # TensorRT-LLM's newer name of random_seed
    TensorSpec("min_length", "TYPE_INT32", (1,), optional=True),  # its older name of min_tokens
    # TensorRT-LLM's ensemble/BLS inputs with one meaning here (client.py says which values):
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("bad_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("beam_width", "TYPE_INT32", (1,), optional=True),
    TensorSpec("num_return_sequences", "TYPE_INT32", (1,), optional=True),
    TensorSpec("pad_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("return_perf_metrics", "TYPE_BOOL", (1,), optional=True),
)
# output_log_probs (the log-probability of each token of this response) and cum_log_probs (their
# sum over the request so far) are sent only when the request set return_log_probs.
CLIENT_OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("cum_log_probs", "TYPE_FP32", (1,)),
    # TensorRT-LLM's: the request's place in its batch and its sequence (always 0 here: one
    # request per batch row, one sequence per request), in the final response.
    TensorSpec("batch_index", "TYPE_INT32", (1,)),
    TensorSpec("sequence_index", "TYPE_INT32", (1,)),
    # With return_perf_metrics, in the final response (TensorRT-LLM's names): the KV blocks the
    # sequence held where it ended (the decode instance's, disaggregated), and wall-clock times in
    # ns since the Unix epoch: arrival at the entry model, the start of its prefill step, the
    # first token drawn, the last token drawn.
    TensorSpec("kv_cache_alloc_new_blocks", "TYPE_INT32", (1,)),
    TensorSpec("kv_cache_reused_blocks", "TYPE_INT32", (1,)),
    TensorSpec("kv_cache_alloc_total_blocks", "TYPE_INT32", (1,)),
    TensorSpec("arrival_time_ns", "TYPE_INT64", (1,)),
    TensorSpec("first_scheduled_time_ns", "TYPE_INT64", (1,)),
    TensorSpec("first_token_time_ns", "TYPE_INT64", (1,)),
    TensorSpec("last_token_time_ns", "TYPE_INT64", (1,)),
)

PREFILL_INPUTS = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    *SAMPLING_INPUTS,
    TensorSpec("request_id", "TYPE_STRING", (1,), optional=True),
    TensorSpec("reply_to", "TYPE_STRING", (1,), optional=True),
)
# Prefill and decode are called by the orchestrator through BLS, where an error response from a
# python model is lost (2.51), so they report errors in-band: finish_reason "error" and the
# message in error_message.
ERROR_OUTPUT = TensorSpec("error_message", "TYPE_STRING", (1,))

# Prefill and decode answer every request they accept at once with an empty response (no output
# tensors), then with their results (TritonSink.acknowledge says why); a request with a reply_to
# token channel gets an empty final response, and its results go over the channel (wire.py).
INBAND_ERROR_OUTPUTS = (TensorSpec("finish_reason", "TYPE_STRING", (1,)), ERROR_OUTPUT)
PREFILL_OUTPUTS = (
    TensorSpec("first_token", "TYPE_INT32", (1,)),
    TensorSpec("kv_handle", "TYPE_STRING", (1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
    TensorSpec("first_log_prob", "TYPE_FP32", (1,)),  # only with return_log_probs
    # When the prefill step began and its first token was drawn (ns since the Unix epoch), and the
    # KV blocks the sequence held on the prefill instance.
    TensorSpec("first_scheduled_time_ns", "TYPE_INT64", (1,)),
    TensorSpec("first_token_time_ns", "TYPE_INT64", (1,)),
    TensorSpec("kv_blocks", "TYPE_INT32", (1,)),
    ERROR_OUTPUT,
)

# A decode request is either a sequence to continue (input_ids, first_token, kv_handle, max_tokens
# and the sampling inputs, under a request_id: DecodeRequest) or a control request {request_id,
# cancel: true} that stops the sequence of that id (DecodeCancel). So every input is optional in
# config.pbtxt; the `cancel` tag tells the two apart (message.decode.read_decode_input).
DECODE_INPUTS = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,), optional=True),
    TensorSpec("first_token", "TYPE_INT32", (1,), optional=True),
    TensorSpec("kv_handle", "TYPE_STRING", (1,), optional=True),
    *(spec._replace(optional=True) for spec in SAMPLING_INPUTS),
    TensorSpec("request_id", "TYPE_STRING", (1,), optional=True),
    TensorSpec("cancel", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("reply_to", "TYPE_STRING", (1,), optional=True),
)
DECODE_OUTPUTS = (
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1,)),  # only with return_log_probs
    # On the last chunk: when its token was drawn (ns since the Unix epoch), and the KV blocks the
    # sequence held on the decode instance.
    TensorSpec("last_token_time_ns", "TYPE_INT64", (1,)),
    TensorSpec("kv_blocks", "TYPE_INT32", (1,)),
    ERROR_OUTPUT,
)

MODEL_INTERFACES: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "orchestrator": (CLIENT_INPUTS, CLIENT_OUTPUTS),
    "colocated": (CLIENT_INPUTS, CLIENT_OUTPUTS),
    "prefill": (PREFILL_INPUTS, PREFILL_OUTPUTS),
    "decode": (DECODE_INPUTS, DECODE_OUTPUTS),
}
