"""Triton python-backend model: the decode instance (decoupled, streaming).

Inputs: input_ids (the prompt), first_token, kv_handle (from prefill) and the sampling inputs.
Pulls the KV named by the handle into its own pool, then decodes with continuous batching over
every request it holds, streaming output_ids (each response has the tokens made since the previous
one: one, unless its send fell behind; see common/outbox.py) and, on the last one,
finish_reason with the final flag.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from backends.common import params as P
from backends.common.interface import DECODE_INPUTS
from backends.common.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from backends.common.outbox import Outbox
from backends.common.requests import parse_ids, parse_sampling, text_input
from backends.common.sink import merge_outputs, token_outputs
from backends.common.triton_glue import PB_LOCK, Metrics, TritonSink, freeze_startup_heap, read_inputs
from backends.decode.worker import DecodeJob, DecodeMetrics, DecodeWorker
from engine.engine import LLMEngine
from engine.errors import RequestError
from kv_transfer.config import ReceiverConfig
from kv_transfer.errors import KVHandleError
from kv_transfer.factory import create_receiver
from kv_transfer.handle import KVHandle

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params, root = P.decoupled_model_parameters(args)
        engine_config = P.engine_config(params, root)
        transport, _, _ = P.kv_settings(params)
        self.engine = LLMEngine(engine_config)
        self.receiver = create_receiver(transport, self.engine.pool, ReceiverConfig())
        # Kept on self: a metric family must outlive its metrics.
        self.metric_registry = m = Metrics(args["model_name"], args["model_instance_name"])
        # Tokens go out from the outbox's thread: the decode loop never waits on a send.
        self.outbox = Outbox(merge_outputs, name="decode-outbox")
        self.worker = DecodeWorker(
            self.engine,
            self.receiver,
            DecodeMetrics(
                running=m.gauge("disagg_running_sequences", "Sequences in the decode batch"),
                waiting=m.gauge(
                    "disagg_decode_queue_depth", "Requests waiting for decode memory or their KV"
                ),
                free_blocks=m.gauge("disagg_kv_free_blocks", "Free KV blocks in the instance's pool"),
                batch_size=m.histogram(
                    "disagg_decode_batch_size", "Sequences per decode step", BATCH_BUCKETS
                ),
                kv_transfer_seconds=m.histogram(
                    "disagg_kv_transfer_seconds", "Time to pull one request's KV", LATENCY_BUCKETS
                ),
                kv_transfer_bytes=m.counter(
                    "disagg_kv_transfer_bytes_total", "KV bytes pulled from prefill instances"
                ),
                kv_transfer_failures=m.counter("disagg_kv_transfer_failures_total", "KV pulls that failed"),
                cancelled=m.counter("disagg_cancelled_total", "Requests cancelled before completion"),
            ),
        )
        freeze_startup_heap()

    def execute(self, requests: list[Any]) -> None:
        with PB_LOCK:  # the worker threads use pb_utils too (see triton_glue.PB_LOCK)
            self._accept(requests)

    def _accept(self, requests: list[Any]) -> None:
        for request in requests:
            sink = TritonSink(request, inband_errors=True)
            try:
                inputs = read_inputs(request, DECODE_INPUTS)
                request_id = text_input(inputs, "request_id") if "request_id" in inputs else ""
                if "cancel" in inputs and bool(np.asarray(inputs["cancel"]).reshape(-1)[0]):
                    if not request_id:
                        raise RequestError("a cancel request needs the request_id of the sequence to stop")
                    self.worker.cancel(request_id)
                    sink.send(token_outputs([], "abort"), final=True)
                    continue
                for name in ("input_ids", "first_token", "kv_handle"):
                    if name not in inputs:
                        raise RequestError(f"missing required input '{name}'")
                seq = self.engine.new_sequence(parse_ids(inputs), parse_sampling(inputs), request_id)
                first = parse_ids(inputs, "first_token")
                if len(first) != 1:
                    raise RequestError("input 'first_token' must hold exactly one token id")
                seq.output_ids.append(first[0])
                handle = KVHandle.decode(text_input(inputs, "kv_handle").encode())
            except (RequestError, KVHandleError) as e:
                sink.error(str(e))
                continue
            sink.acknowledge()  # directly: before any token of this request
            self.worker.submit(DecodeJob(seq, handle, self.outbox.sink(sink)))

    def finalize(self) -> None:
        self.worker.stop()
        self.outbox.close()  # after the worker has ended every request: their final responses
        self.receiver.close()
        self.metric_registry.close()
