"""The messages between the orchestrator and the phases: prefill request and result, decode
request, decode cancel, decode chunk, and the in-band error both phases answer with.

Prefill and decode are called through BLS, where an error response from a python model is lost
(2.51), so they report a failed request in-band: finish_reason "error" and error_message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from backends.message.codec import Message, StreamChunk, Tensors, decode, specs_named
from backends.message.specs import (
    DECODE_INPUTS,
    DECODE_OUTPUTS,
    INBAND_ERROR_OUTPUTS,
    PREFILL_INPUTS,
    PREFILL_OUTPUTS,
    SAMPLING_INPUTS,
    TensorSpec,
)
from engine.errors import RequestError
from engine.sampling import SamplingParams

ERROR = "error"  # the finish_reason of an in-band error
ABORT = "abort"  # the finish_reason of a sequence stopped by a cancel


@dataclass(frozen=True, kw_only=True)
class Sampling(Message):
    """The sampling inputs every request carries (TensorRT-LLM's names)."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = SAMPLING_INPUTS

    max_tokens: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    random_seed: int | None = None
    end_id: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    return_log_probs: bool = False
    ignore_eos: bool = False
    bad_word_ids: tuple[int, ...] = ()
    bad_word_lens: tuple[int, ...] = ()

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters. Absent temperature means greedy; top_k 0 and top_p 0 mean off,
        and both 0 mean greedy, as in TensorRT-LLM; end_id replaces the model's EOS as the token
        that ends output (as ignore_eos does without a replacement)."""
        if self.end_id is not None and self.end_id < 0:
            raise RequestError(f"end_id must be a token id >= 0, got {self.end_id}")
        has_end = self.end_id is not None
        if sum(self.bad_word_lens) != len(self.bad_word_ids) or any(n < 1 for n in self.bad_word_lens):
            raise RequestError(
                f"bad_word_lens must be positive and add up to the {len(self.bad_word_ids)} bad_word_ids, "
                f"got {list(self.bad_word_lens)}"
            )
        temperature = 0.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0.0:  # TensorRT-LLM's "off"; with top_k off too, its greedy search
            top_p = 1.0
            if not self.top_k:
                temperature = 0.0
        starts = [sum(self.bad_word_lens[:i]) for i in range(len(self.bad_word_lens))]
        bad_words = tuple(
            self.bad_word_ids[s : s + n] for s, n in zip(starts, self.bad_word_lens, strict=True)
        )
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=temperature,
            top_k=0 if self.top_k is None else self.top_k,
            top_p=top_p,
            seed=self.random_seed,
            stop_token_ids=(self.end_id,) if self.end_id is not None else (),
            ignore_eos=has_end or self.ignore_eos,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=0.0 if self.presence_penalty is None else self.presence_penalty,
            frequency_penalty=0.0 if self.frequency_penalty is None else self.frequency_penalty,
            min_tokens=0 if self.min_tokens is None else self.min_tokens,
            logprobs=self.return_log_probs,
            bad_words=bad_words,
        )

    @staticmethod
    def fields_of(
        params: SamplingParams, seed: int
    ) -> dict[str, int | float | bool | tuple[int, ...] | None]:
        """The sampling fields that make `params` (with its seed fixed) again on the other side."""
        return {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "random_seed": seed,
            "end_id": params.stop_token_ids[0] if params.stop_token_ids else None,
            "repetition_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "min_tokens": params.min_tokens,
            "return_log_probs": params.logprobs,
            "ignore_eos": params.ignore_eos,
            "bad_word_ids": tuple(t for word in params.bad_words for t in word),
            "bad_word_lens": tuple(len(word) for word in params.bad_words),
        }


@dataclass(frozen=True, kw_only=True)
class PrefillRequest(Sampling):
    """Orchestrator -> prefill: a prompt to prefill. With `reply_to` (a token channel, wire.py;
    it needs a request_id of 32 hex digits) the BLS call is answered with one empty final response
    once the request is accepted, and the PrefillResult goes over the channel."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = PREFILL_INPUTS
    REPLY: ClassVar[tuple[TensorSpec, ...]] = PREFILL_OUTPUTS

    input_ids: tuple[int, ...]
    request_id: str | None = None
    reply_to: str = ""


@dataclass(frozen=True, kw_only=True)
class PrefillResult(Message):
    """Prefill -> orchestrator: the first token and the handle of the leased KV (empty when the
    first token already ended the request, which then has its finish_reason)."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = specs_named(
        PREFILL_OUTPUTS,
        "first_token",
        "kv_handle",
        "finish_reason",
        "first_log_prob",
        "first_scheduled_time_ns",
        "first_token_time_ns",
        "kv_blocks",
    )

    first_token: int
    kv_handle: bytes = b""
    finish_reason: str = ""
    first_log_prob: float | None = None  # with return_log_probs
    first_scheduled_time_ns: int = 0  # the prefill step's start, ns since the Unix epoch
    first_token_time_ns: int = 0  # when the first token was drawn
    kv_blocks: int = 0  # the KV blocks the sequence held on the prefill instance


@dataclass(frozen=True, kw_only=True)
class DecodeRequest(Sampling):
    """Orchestrator -> decode: continue a prefilled sequence whose KV the handle names. With
    `reply_to` (a token channel, wire.py) the BLS call is answered with one empty final response
    once the request is accepted, and the tokens go over the channel; without, they stream back
    as DecodeChunks on the call."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = DECODE_INPUTS
    REPLY: ClassVar[tuple[TensorSpec, ...]] = DECODE_OUTPUTS

    input_ids: tuple[int, ...]
    first_token: int
    kv_handle: bytes
    request_id: str = ""
    reply_to: str = ""


@dataclass(frozen=True, kw_only=True)
class DecodeCancel(Message):
    """Orchestrator -> decode: stop the sequence of `request_id` (the reply is a DecodeChunk
    with finish_reason "abort")."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = specs_named(DECODE_INPUTS, "request_id", "cancel")
    REPLY: ClassVar[tuple[TensorSpec, ...]] = INBAND_ERROR_OUTPUTS

    request_id: str
    cancel: bool = True


def read_decode_input(tensors: Mapping[str, np.ndarray]) -> DecodeRequest | DecodeCancel:
    """What a decode request is: a cancel when it carries `cancel: true`, else a sequence."""
    cancel_spec = DecodeCancel.SPECS[1]
    if cancel_spec.name in tensors and decode(cancel_spec, tensors[cancel_spec.name]):
        cancel = DecodeCancel.from_tensors({"request_id": np.asarray([b""], dtype=object), **tensors})
        if not cancel.request_id:
            raise RequestError("a cancel request needs the request_id of the sequence to stop")
        return cancel
    return DecodeRequest.from_tensors(tensors)


@dataclass(frozen=True, kw_only=True)
class DecodeChunk(StreamChunk):
    """Decode -> orchestrator: the tokens made since the previous chunk; the last chunk has the
    finish_reason. A chunk with neither is a heartbeat (the instance is alive, the request waits)."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = specs_named(
        DECODE_OUTPUTS, "output_ids", "finish_reason", "output_log_probs", "last_token_time_ns", "kv_blocks"
    )

    output_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    output_log_probs: tuple[float, ...] = ()  # one per output id, with return_log_probs; else none
    # The last chunk's (when it has a finish_reason other than an abort): when its token was drawn
    # (ns since the Unix epoch) and the KV blocks the sequence held on the decode instance.
    last_token_time_ns: int | None = None
    kv_blocks: int | None = None

    @property
    def is_heartbeat(self) -> bool:
        return not self.output_ids and not self.finish_reason

    def merge(self, later: DecodeChunk) -> DecodeChunk:
        """This chunk and the next of the same stream as one."""
        return DecodeChunk(
            output_ids=self.output_ids + later.output_ids,
            finish_reason=later.finish_reason,
            output_log_probs=self.output_log_probs + later.output_log_probs,
            last_token_time_ns=later.last_token_time_ns,
            kv_blocks=later.kv_blocks,
        )


@dataclass(frozen=True, kw_only=True)
class InbandError(Message):
    """Prefill or decode -> orchestrator: the request failed, for the reason in error_message."""

    SPECS: ClassVar[tuple[TensorSpec, ...]] = INBAND_ERROR_OUTPUTS

    error_message: str
    finish_reason: str = ERROR

    @staticmethod
    def find(tensors: Tensors) -> InbandError | None:
        """The in-band error a response carries, else None."""
        reason = tensors.get("finish_reason")
        if reason is None or np.asarray(reason, dtype=object).reshape(-1)[0] not in (ERROR, ERROR.encode()):
            return None
        if "error_message" not in tensors:
            return InbandError(error_message="unknown error")
        return InbandError.from_tensors(tensors)
