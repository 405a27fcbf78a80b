"""One client request through prefill then decode: the orchestrator's per-request job.

Kept free of pb_utils: the model passes in `call`, which runs a BLS request against a model and
returns an iterator of response dicts (raising PhaseError for an error response), with a
`cancel()` on the iterator.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from backends.common.client_stream import ClientStream
from backends.engine.sampling import SamplingParams
from backends.orchestrator.leases import LeaseReleaser
from backends.orchestrator.router import Router


class PhaseError(RuntimeError):
    """An error response from prefill or decode; its message is passed on to the client."""


class Responses(Protocol):
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def cancel(self) -> None: ...


Call = Callable[[str, dict[str, np.ndarray]], Responses]


def sampling_tensors(params: SamplingParams, seed: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {
        "max_tokens": np.asarray([params.max_tokens], dtype=np.int32),
        "temperature": np.asarray([params.temperature], dtype=np.float32),
        "top_k": np.asarray([params.top_k], dtype=np.int32),
        "top_p": np.asarray([params.top_p], dtype=np.float32),
        "random_seed": np.asarray([seed], dtype=np.uint64),
    }
    if params.stop_token_ids:
        out["end_id"] = np.asarray([params.stop_token_ids[0]], dtype=np.int32)
    return out


def _text(arr: np.ndarray) -> str:
    value = np.asarray(arr, dtype=object).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


class Pipeline:
    def __init__(self, call: Call, prefill: Router, decode: Router, leases: LeaseReleaser) -> None:
        self.call = call
        self.prefill = prefill
        self.decode = decode
        self.leases = leases

    def run(self, ids: list[int], params: SamplingParams, stream: ClientStream) -> None:
        """Streams the request's tokens into `stream`; always ends it (final response or error)."""
        try:
            self._run(ids, params, stream)
        except PhaseError as exc:
            stream.error(str(exc))
        except Exception as exc:
            stream.error(f"orchestrator error: {exc!r}")

    def _run(self, ids: list[int], params: SamplingParams, stream: ClientStream) -> None:
        # Prefill and decode must draw from the same random stream: fix the seed here.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        common = {"input_ids": np.asarray(ids, dtype=np.int32), **sampling_tensors(params, seed)}
        with self.prefill.route(len(ids)) as model:
            first = self._single(self.call(model, common))
        token = int(np.asarray(first["first_token"]).reshape(-1)[0])
        handle = bytes(np.asarray(first["kv_handle"], dtype=object).reshape(-1)[0])
        reason = _text(first["finish_reason"]) or None
        if stream.push([token], reason) or stream.is_cancelled():
            if handle:  # nobody will pull it
                self.leases.release(handle)
            return
        inputs = {
            **common,
            "first_token": np.asarray([token], dtype=np.int32),
            "kv_handle": np.asarray([handle], dtype=object),
        }
        with self.decode.route(params.max_tokens - 1) as model:
            responses = self.call(model, inputs)
            for r in responses:
                if stream.is_cancelled():
                    responses.cancel()
                    return
                if "output_ids" not in r:
                    continue  # an empty final response
                tokens = [int(t) for t in np.asarray(r["output_ids"]).reshape(-1)]
                reason = _text(r["finish_reason"]) or None
                if stream.push(tokens, reason):
                    if reason is None:  # a stop word: decode must stop too
                        responses.cancel()
                    return
        if not stream.done:
            stream.error("decode ended without a final token")

    @staticmethod
    def _single(responses: Responses) -> dict[str, Any]:
        result = None
        for r in responses:
            if "first_token" in r:
                result = r
        if result is None:
            raise PhaseError("prefill returned no result")
        return result
