"""Triton python-backend model: prefill and decode in one instance (decoupled, streaming).

Same tensor interface as the orchestrator (TensorRT-LLM ensemble names), so the same client can
measure the colocated baseline and the disaggregated deployment.
"""

from __future__ import annotations

import time
from typing import Any

from backends.colocated.worker import ColocatedMetrics, ColocatedWorker
from backends.common import metrics as M
from backends.common import trace
from backends.common.client_stream import ClientStream, RequestMetrics
from backends.common.cpu_priority import lower_priority
from backends.common.outbox import Outbox
from backends.common.params import EngineParams, model_parameters
from backends.common.triton_glue import (
    PB_LOCK,
    Metrics,
    TritonSink,
    count_refusals,
    freeze_startup_heap,
    read_inputs,
    read_parameters,
)
from backends.message import ClientRequest, check_parameters
from backends.message.specs import CLIENT_INPUTS
from engine.engine import LLMEngine
from engine.errors import RequestError
from engine.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        trace.configure(args["model_name"])
        raw, root = model_parameters(args)
        params = EngineParams.from_parameters(raw)
        lower_priority(params.cpu_nice)  # first: every thread and worker started below inherits it
        engine_config = params.engine_config(root)
        self.engine = LLMEngine(engine_config)
        self.tokenizer = load_tokenizer(engine_config.model_dir)
        # Kept on self: a metric family must outlive its metrics.
        self.metric_registry = m = Metrics(args["model_name"], args["model_instance_name"])
        self.request_metrics = RequestMetrics.create(m.create)
        # As in decode: the engine loop hands responses over and never waits on a send.
        self.outbox = Outbox(name="colocated-outbox")
        self.worker = ColocatedWorker(
            self.engine,
            ColocatedMetrics(
                running=m.create_queued(M.RUNNING_SEQUENCES),
                waiting=m.create_queued(M.PREFILL_QUEUE_DEPTH),
                free_blocks=m.create_queued(M.KV_FREE_BLOCKS),
                batch_size=m.create_queued(M.DECODE_BATCH_SIZE),
                cancelled=m.create_queued(M.CANCELLED),
                prefill_seconds=m.create_queued(M.PREFILL_SECONDS),
            ),
        )
        freeze_startup_heap()

    def execute(self, requests: list[Any]) -> None:
        arrived = time.perf_counter()  # before the lock: waiting for it is part of TTFT
        trace.mark("arrive")
        with PB_LOCK:  # the worker threads use pb_utils too (see triton_glue.PB_LOCK)
            refused = self._accept(requests, arrived)
        count_refusals(refused, len(requests))

    def _accept(self, requests: list[Any], arrived: float) -> int:
        """Starts each request, or answers it with its error; returns how many were refused."""
        refused = 0
        for request in requests:
            sink = TritonSink(request)
            try:
                if self.engine.dead is not None:
                    raise RequestError(f"colocated instance out of service: {self.engine.dead}")
                req = ClientRequest.from_tensors(read_inputs(request, CLIENT_INPUTS))
                check_parameters(read_parameters(request))
                seq = self.engine.new_sequence(
                    req.prompt_ids_with(self.tokenizer), req.params_with(self.tokenizer), request.request_id()
                )
            except RequestError as e:
                self.request_metrics.failures.increment(1)
                sink.error(str(e))
                refused += 1
                continue
            # Colocated's default is this project's: the prompt only when a request asks for it.
            stream = ClientStream.of(
                req, seq.prompt_ids, self.outbox.sink(sink), self.tokenizer, self.request_metrics, arrived
            )
            self.worker.submit((seq, stream))
        return refused

    def finalize(self) -> None:
        self.worker.stop()
        self.outbox.close()  # after the worker has ended every request: their final responses
        self.engine.close()
        self.metric_registry.close()
