"""Parsing and validating request tensors into engine-level requests.

Every problem raises RequestError with a message naming the input and the problem; the models
turn it into an error response for that request only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import RequestError
from engine.sampling import SamplingParams

Inputs = Mapping[str, np.ndarray]

# Generous sanity bounds that keep a malformed request from allocating absurd amounts of memory
# before the engine's own checks (context length) apply.
MAX_STOP_WORDS = 16
MAX_STOP_WORD_CHARS = 256


def _scalar(inputs: Inputs, name: str, kind: type, default: Any = None) -> Any:
    if name not in inputs:
        if default is None:
            raise RequestError(f"missing required input '{name}'")
        return default
    arr = np.asarray(inputs[name])
    if arr.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if kind is bool:
        return bool(value)
    if kind is int:
        if not np.issubdtype(arr.dtype, np.integer):
            raise RequestError(f"input '{name}' must be an integer, got {arr.dtype}")
        return int(value)
    if not np.issubdtype(arr.dtype, np.number):
        raise RequestError(f"input '{name}' must be a number, got {arr.dtype}")
    return float(value)


def _utf8(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"input '{name}' is not valid UTF-8: {e}") from None
    raise RequestError(f"input '{name}' must be a string, got {type(value).__name__}")


def text_input(inputs: Inputs, name: str) -> str:
    """A one-string input (BYTES [1]) as text."""
    arr = np.asarray(inputs[name], dtype=object).reshape(-1)
    if arr.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one string, got {arr.size}")
    return _utf8(arr[0], name)


def parse_sampling(inputs: Inputs) -> SamplingParams:
    """max_tokens (required), temperature, top_k, top_p, random_seed, end_id.
    Absent temperature means greedy; end_id replaces the model's EOS as the token that ends output."""
    end_id = _scalar(inputs, "end_id", int, default=-1)
    if "end_id" in inputs and end_id < 0:
        raise RequestError(f"end_id must be a token id >= 0, got {end_id}")
    seed = _scalar(inputs, "random_seed", int, default=-1) if "random_seed" in inputs else None
    return SamplingParams(
        max_tokens=_scalar(inputs, "max_tokens", int),
        temperature=_scalar(inputs, "temperature", float, default=0.0),
        top_k=_scalar(inputs, "top_k", int, default=0),
        top_p=_scalar(inputs, "top_p", float, default=1.0),
        seed=seed,
        stop_token_ids=(end_id,) if end_id >= 0 else (),
        ignore_eos=end_id >= 0,
    )


def parse_ids(inputs: Inputs, name: str = "input_ids") -> list[int]:
    arr = np.asarray(inputs[name])
    if not np.issubdtype(arr.dtype, np.integer):
        raise RequestError(f"input '{name}' must be integer token ids, got {arr.dtype}")
    return [int(t) for t in arr.reshape(-1)]


@dataclass(frozen=True)
class ClientRequest:
    """A request to orchestrator or colocated, before tokenization."""

    text: str | None
    prompt_ids: list[int] | None
    params: SamplingParams
    stream: bool
    stop_words: tuple[str, ...]


def parse_client_request(inputs: Inputs) -> ClientRequest:
    has_text, has_ids = "text_input" in inputs, "input_ids" in inputs
    if has_text == has_ids:
        raise RequestError("give exactly one of 'text_input' or 'input_ids'")
    text = None
    ids = None
    if has_text:
        arr = np.asarray(inputs["text_input"], dtype=object)
        if arr.size != 1:
            raise RequestError(
                f"input 'text_input' must hold exactly one string, got shape {list(arr.shape)}"
            )
        text = _utf8(arr.reshape(-1)[0], "text_input")
        if not text:
            raise RequestError("input 'text_input' is empty")
    else:
        ids = parse_ids(inputs)
        if not ids:
            raise RequestError("input 'input_ids' is empty")
    stop_words: tuple[str, ...] = ()
    if "stop_words" in inputs:
        raw = np.asarray(inputs["stop_words"], dtype=object).reshape(-1)
        if raw.size > MAX_STOP_WORDS:
            raise RequestError(f"at most {MAX_STOP_WORDS} stop_words, got {raw.size}")
        words = tuple(_utf8(w, "stop_words") for w in raw)
        if any(not w or len(w) > MAX_STOP_WORD_CHARS for w in words):
            raise RequestError(f"each stop word must have 1 to {MAX_STOP_WORD_CHARS} characters")
        stop_words = words
    return ClientRequest(
        text=text,
        prompt_ids=ids,
        params=parse_sampling(inputs),
        stream=_scalar(inputs, "stream", bool, default=False),
        stop_words=stop_words,
    )


def prompt_ids(request: ClientRequest, tokenizer: Any) -> list[int]:
    """The request's prompt as token ids: text through the model's tokenizer (as AutoTokenizer
    does, special tokens included), or the given ids."""
    if request.prompt_ids is not None:
        return request.prompt_ids
    assert request.text is not None
    return [int(t) for t in tokenizer(request.text).input_ids]
