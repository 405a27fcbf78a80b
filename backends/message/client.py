"""The messages between a client and the client-facing models (orchestrator and colocated).

Every problem with a request raises RequestError with a message naming the input and the
problem; the models turn it into an error response for that request only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from backends.message.codec import StreamChunk
from backends.message.phases import Sampling
from backends.message.specs import CLIENT_INPUTS, CLIENT_OUTPUTS, TensorSpec
from engine.errors import RequestError
from engine.sampling import SamplingParams

# Generous sanity bounds that keep a malformed request from allocating absurd amounts of memory
# before the engine's own checks (context length) apply.
MAX_STOP_WORDS = 16
CLIENT_INPUT_NAMES = tuple(spec.name for spec in CLIENT_INPUTS)
MAX_STOP_WORD_CHARS = 256


@dataclass(frozen=True, kw_only=True)
class ClientInputs(Sampling):
    """A request's tensors as sent (checked for type and shape, not yet for meaning)."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = CLIENT_INPUTS

    text_input: str | None = None
    input_ids: tuple[int, ...] | None = None
    stream: bool = False
    stop_words: tuple[str, ...] = ()
    seed: int | None = None
    min_length: int | None = None
    exclude_input_in_output: bool | None = None
    bad_words: tuple[str, ...] = ()
    beam_width: int | None = None
    num_return_sequences: int | None = None
    pad_id: int | None = None
    return_perf_metrics: bool = False


@dataclass(frozen=True)
class ClientRequest:
    """A request to orchestrator or colocated, before tokenization."""

    text: str | None
    prompt_ids: list[int] | None
    params: SamplingParams
    stream: bool
    stop_words: tuple[str, ...]
    exclude_input: bool | None = None  # None: the model's default (OrchestratorParams.input_in_output)
    bad_words: tuple[str, ...] = ()  # as text: tokenized by the model's tokenizer (params_with)
    perf_metrics: bool = False  # TensorRT-LLM's return_perf_metrics: timings and KV blocks at the end

    @staticmethod
    def from_tensors(tensors: Mapping[str, np.ndarray]) -> ClientRequest:
        if ("text_input" in tensors) == ("input_ids" in tensors):
            raise RequestError("give exactly one of 'text_input' or 'input_ids'")
        raw = ClientInputs.from_tensors(tensors)
        if raw.text_input is not None and not raw.text_input:
            raise RequestError("input 'text_input' is empty")
        if raw.input_ids is not None and not raw.input_ids:
            raise RequestError("input 'input_ids' is empty")
        # TensorRT-LLM's clients send "" for "no stop words".
        stop_words = tuple(w for w in raw.stop_words if w)
        if len(stop_words) > MAX_STOP_WORDS:
            raise RequestError(f"at most {MAX_STOP_WORDS} stop_words, got {len(stop_words)}")
        if any(len(w) > MAX_STOP_WORD_CHARS for w in stop_words):
            raise RequestError(f"each stop word must have at most {MAX_STOP_WORD_CHARS} characters")
        # TensorRT-LLM's other names of an option: `seed` (newer) and `min_length` (older).
        raw = dataclasses.replace(
            raw,
            random_seed=_one_option("seed", raw.seed, "random_seed", raw.random_seed),
            min_tokens=_one_option("min_length", raw.min_length, "min_tokens", raw.min_tokens),
        )
        _check_tensorrt_llm_options(raw)
        return ClientRequest(
            text=raw.text_input,
            prompt_ids=None if raw.input_ids is None else list(raw.input_ids),
            params=raw.sampling_params(),
            stream=raw.stream,
            stop_words=stop_words,
            exclude_input=raw.exclude_input_in_output,
            bad_words=tuple(w for w in raw.bad_words if w),
            perf_metrics=raw.return_perf_metrics,
        )

    def params_with(self, tokenizer: Any) -> SamplingParams:
        """The sampling parameters with the bad words as token ids (each word tokenized alone,
        without special tokens, as TensorRT-LLM's preprocessing does), after any given as ids."""
        if not self.bad_words:
            return self.params
        words = [
            tuple(int(t) for t in tokenizer(w, add_special_tokens=False).input_ids) for w in self.bad_words
        ]
        if not all(words):
            raise RequestError("a bad word gives no tokens")
        return dataclasses.replace(self.params, bad_words=self.params.bad_words + tuple(words))

    def prompt_ids_with(self, tokenizer: Any) -> list[int]:
        """The prompt as token ids: text through the model's tokenizer (as AutoTokenizer does,
        special tokens included), or the given ids."""
        if self.prompt_ids is not None:
            return self.prompt_ids
        assert self.text is not None
        return [int(t) for t in tokenizer(self.text).input_ids]


# Request parameters Triton itself defines (KServe's, sequence batching's); "triton_*" are reserved.
TRITON_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output", "headers"}
)


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """A request's parameters: Triton's HTTP /generate turns every JSON key that is not an input
    into one, so a misspelled or unsupported option arrives here and is refused by name."""
    unknown = sorted(k for k in parameters if not k.startswith("triton_") and k not in TRITON_PARAMETERS)
    if unknown:
        raise RequestError(
            f"unknown input or option {unknown[0]!r} (the inputs are: {', '.join(CLIENT_INPUT_NAMES)})"
        )


def _one_option(name: str, value: int | None, other_name: str, other: int | None) -> int | None:
    """The value of an option that has two names: either one, or both when they agree."""
    if value is not None and other is not None and value != other:
        raise RequestError(
            f"'{name}' ({value}) and '{other_name}' ({other}) are the same option; give one, or the same value"
        )
    return other if value is None else value


def _check_tensorrt_llm_options(raw: ClientInputs) -> None:
    """TensorRT-LLM's options with one value here: anything else is refused by name. pad_id has no
    effect (a response is one sequence, never padded), so any id is accepted."""
    if raw.beam_width not in (None, 1):
        raise RequestError(f"beam search is not supported: beam_width must be 1, got {raw.beam_width}")
    if raw.num_return_sequences not in (None, 1):
        raise RequestError(
            f"num_return_sequences must be 1 (one sequence per request), got {raw.num_return_sequences}"
        )
    if raw.pad_id is not None and raw.pad_id < 0:
        raise RequestError(f"pad_id must be a token id >= 0, got {raw.pad_id}")


@dataclass(frozen=True, kw_only=True)
class ClientChunk(StreamChunk):
    """A response to the client: when streaming, the text and ids made since the previous one
    (all of it otherwise); the last one has the finish_reason ("stop" or "length")."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = CLIENT_OUTPUTS

    text_output: str
    output_ids: tuple[int, ...]
    finish_reason: str = ""
    output_log_probs: tuple[float, ...] | None = None  # this response's tokens', with return_log_probs
    cum_log_probs: float | None = None  # their sum over the whole request so far
    # The final response's (specs.CLIENT_OUTPUTS says what each is); None: not sent.
    batch_index: int | None = None
    sequence_index: int | None = None
    kv_cache_alloc_new_blocks: int | None = None
    kv_cache_reused_blocks: int | None = None
    kv_cache_alloc_total_blocks: int | None = None
    arrival_time_ns: int | None = None
    first_scheduled_time_ns: int | None = None
    first_token_time_ns: int | None = None
    last_token_time_ns: int | None = None

    def merge(self, later: ClientChunk) -> ClientChunk:
        """This response and the next of the same stream as one (the final fields are the later's)."""
        logprobs = None
        if self.output_log_probs is not None and later.output_log_probs is not None:
            logprobs = self.output_log_probs + later.output_log_probs
        return dataclasses.replace(
            later,
            text_output=self.text_output + later.text_output,
            output_ids=self.output_ids + later.output_ids,
            output_log_probs=logprobs,
        )
