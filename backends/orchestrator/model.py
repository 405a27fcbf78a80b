"""Triton python-backend model: the orchestrator (decoupled BLS), and the entry points for
TensorRT-LLM's clients (`ensemble`, `tensorrt_llm_bls`: the same model with a batch dimension).

For each client request, on a worker thread (many requests in flight in one instance): tokenize,
call a prefill replica, stream the first token at once, call a decode replica and stream the rest,
with incremental detokenization, stop words, a per-request error on any failure, and always the
final flag. Replicas are chosen by least outstanding tokens from the routing table in the
parameters prefill_models and decode_models (and routing_groups, which keeps a request on the
replicas of one node group). Written with decoupled false (unary: gRPC ModelInfer, HTTP /infer
and /generate), execute() returns each request's one response once all of its call's requests
have ended (unary.py).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.common import trace
from backends.common.client_stream import ClientStream, RequestMetrics
from backends.common.params import (
    OrchestratorParams,
    model_parameters,
    request_context_tokens,
    resolve_model_dir,
)
from backends.common.sink import ResponseSink
from backends.common.triton_glue import (
    PB_LOCK,
    Metrics,
    TritonSink,
    count_refusals,
    fail_unary_call,
    read_inputs,
    read_parameters,
    response_tensors,
)
from backends.message import ClientRequest, DecodeCancel, DecodeRequest, PrefillRequest, check_parameters
from backends.message.specs import CLIENT_INPUTS
from backends.orchestrator.bls import BLSResponses, RetiredIterators
from backends.orchestrator.doors import DoorError, Doors
from backends.orchestrator.inbox import TokenInbox
from backends.orchestrator.pipeline import PhaseError, Pipeline, Timeouts
from backends.orchestrator.router import RoutingTable
from backends.orchestrator.unary import UnarySink
from engine.errors import RequestError, check_context
from engine.tokenizer import load_tokenizer
from kv_transfer import LeaseReleaser

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        trace.configure(args["model_name"])
        raw, root = model_parameters(args, unary_ok=True)
        params = OrchestratorParams.from_parameters(raw)
        self.include_input = params.input_in_output == "include"
        # TensorRT-LLM's entry points batch: their tensors have a leading batch dimension of 1.
        config = json.loads(args["model_config"])
        self.batch_dim = int(config.get("max_batch_size", 0)) > 0
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        model_dir = resolve_model_dir(params.model_dir, root)
        self.tokenizer = load_tokenizer(model_dir)
        # A request that cannot fit an engine behind this model is refused here, before any call.
        self.context_tokens = request_context_tokens(raw, model_dir)
        routes = RoutingTable.parse(params.prefill_models, params.decode_models, params.routing_groups)
        self.leases = LeaseReleaser()
        self.retired = RetiredIterators()
        timeouts = Timeouts(
            prefill_s=params.prefill_timeout_seconds, decode_stall_s=params.decode_stall_timeout_seconds
        )
        # Decode's tokens come back over a token channel, not through the server (docs/overhead.md).
        self.inbox = TokenInbox()
        # Requests go to the phases over their request channels unless told to make BLS calls.
        self.doors = Doors(self.inbox.lose) if params.phase_requests == "socket" else None
        self.pipeline = Pipeline(self._call, routes, self.leases, self.inbox, timeouts)
        # Each in-flight request holds a thread while it waits on BLS responses (the BLS response
        # iterator blocks), so the pool size is the number of concurrent requests served.
        self.pool = ThreadPoolExecutor(params.max_concurrent_requests, thread_name_prefix="orch")
        # Kept on self: a metric family must outlive its metrics.
        self.metric_registry = Metrics(args["model_name"], args["model_instance_name"])
        m = self.metric_registry
        self.request_metrics = RequestMetrics.create(m.create)

    def _call(
        self, model: str, message: PrefillRequest | DecodeRequest | DecodeCancel
    ) -> BLSResponses | None:
        if self.doors is not None:
            try:
                self.doors.send(model, message)
            except DoorError as exc:
                raise PhaseError(str(exc)) from exc
            return None
        names = [spec.name for spec in message.REPLY]
        tensors = message.to_tensors()
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in tensors.items()],
            requested_output_names=names,
        )
        with PB_LOCK:
            iterator = request.exec(decoupled=True)
        return BLSResponses(iterator, names, self.retired, PhaseError)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        arrived = time.perf_counter()  # before the lock: waiting for it is part of TTFT
        trace.mark("arrive")
        if not self.decoupled:
            return self._answer(requests, arrived)
        with PB_LOCK:  # the worker threads use pb_utils too (see triton_glue.PB_LOCK)
            accepted = [
                self._accept(request, TritonSink(request, batch_dim=self.batch_dim), arrived)
                for request in requests
            ]
        count_refusals(accepted.count(False), len(requests))
        return None

    def _answer(self, requests: list[Any], arrived: float) -> list[Any]:
        """Unary: every request of the call runs at once; their responses once all have ended.
        A call whose requests all failed raises instead (fail_unary_call), so that Triton counts
        them as failures."""
        sinks = [UnarySink() for _ in requests]
        with PB_LOCK:
            for request, sink in zip(requests, sinks, strict=True):
                self._accept(request, sink, arrived, unary=True)
        for sink in sinks:  # without the lock: the pipelines' calls need it
            sink.done.wait()  # Pipeline.run always ends its stream (a final response or an error)
        fail_unary_call([s.error_message for s in sinks if s.message is None], len(requests))
        with PB_LOCK:
            return [
                pb_utils.InferenceResponse(error=pb_utils.TritonError(s.error_message))
                if s.message is None
                else pb_utils.InferenceResponse(output_tensors=response_tensors(s.message, self.batch_dim))
                for s in sinks
            ]

    def _accept(self, request: Any, sink: ResponseSink, arrived: float, unary: bool = False) -> bool:
        """Parses the request and starts its pipeline (True), or answers it with its error."""
        try:
            req = ClientRequest.from_tensors(read_inputs(request, CLIENT_INPUTS))
            check_parameters(read_parameters(request))
            if unary and req.stream:
                raise RequestError(
                    "this entry point is unary (written with --decoupled false): stream must be false"
                )
            ids = req.prompt_ids_with(self.tokenizer)
            params = req.params_with(self.tokenizer)
            check_context(len(ids), params.max_tokens, self.context_tokens)
        except RequestError as e:
            self.request_metrics.failures.increment(1)
            sink.error(str(e))
            return False
        stream = ClientStream.of(
            req, ids, sink, self.tokenizer, self.request_metrics, arrived, self.include_input
        )
        self.pool.submit(self.pipeline.run, ids, params, stream)
        return True

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.doors is not None:
            self.doors.close()
        self.inbox.close()
        self.leases.close()
        self.retired.clear()
        self.metric_registry.close()
