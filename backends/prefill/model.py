"""Triton python-backend model: the prefill instance (decoupled; one response per request).

Takes a PrefillRequest (input_ids, max_tokens and the sampling inputs; backends.message) and
answers with a PrefillResult: first_token, kv_handle (empty when the first token already ended the
request) and finish_reason. The KV stays in this instance's pool under lease until a decode instance pulls it.
A request with a `reply_to` token channel has its result sent over that channel (common/channel.py),
written straight from the engine loop; the orchestrator sends its requests over this instance's
request channel (common/door.py), and a BLS call with a reply_to is only answered "accepted".
"""

from __future__ import annotations

import logging
from typing import Any

from backends.common import metrics as M
from backends.common import trace
from backends.common.channel import Channels, ChannelSink
from backends.common.cpu_priority import lower_priority
from backends.common.door import Door, refuse
from backends.common.params import EngineParams, model_parameters
from backends.common.pools import RankPools
from backends.common.triton_glue import PB_LOCK, Metrics, TritonSink, freeze_startup_heap, read_inputs
from backends.message import PrefillRequest, Tensors
from backends.prefill.worker import PrefillJob, PrefillMetrics, PrefillWorker
from engine.engine import LLMEngine
from engine.errors import RequestError
from kv_transfer.config import SenderConfig
from kv_transfer.instance import InstanceSender

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        trace.configure(args["model_name"])
        raw, root = model_parameters(args)
        params = EngineParams.from_parameters(raw)
        lower_priority(params.cpu_nice)  # first: every thread and worker started below inherits it
        engine_config = params.engine_config(root)
        # shm: the pools live in named segments that decode instances map read-only; with several
        # ranks rank 0 leases every rank's pool, so they are shared with it too.
        self.pools = RankPools(engine_config, params.kv_transport == "shm" or engine_config.world_size > 1)
        self.engine = LLMEngine(engine_config, self.pools.pools)
        self.sender = InstanceSender(
            params.kv_transport,
            self.pools.pools or [self.engine.pool],
            self.engine.blocks,
            SenderConfig(port=params.kv_port, lease_ttl_s=params.kv_lease_seconds),
            pp_size=engine_config.pp_size,
            model_layers=self.engine.model_config.num_layers,
        )
        # Kept on self: a metric family must outlive its metrics.
        self.metric_registry = m = Metrics(args["model_name"], args["model_instance_name"])
        self.channels = Channels(args["model_name"])
        self.worker = PrefillWorker(
            self.engine,
            self.sender,
            PrefillMetrics(
                waiting=m.create_queued(M.PREFILL_QUEUE_DEPTH),
                free_blocks=m.create_queued(M.KV_FREE_BLOCKS),
                active_leases=m.create_queued(M.KV_ACTIVE_LEASES),
                batch_tokens=m.create_queued(M.PREFILL_BATCH_TOKENS),
                queue_seconds=m.create_queued(M.PREFILL_QUEUE_SECONDS),
                cancelled=m.create_queued(M.CANCELLED),
                prefill_seconds=m.create_queued(M.PREFILL_SECONDS),
            ),
        )
        log.info(
            "prefill ready: %s, KV transport %s at %s",
            engine_config,
            params.kv_transport,
            self.sender.address,
        )
        # The orchestrator's requests come over the request channel (BLS calls still work).
        self.door = Door(args["model_name"], self._admit)
        freeze_startup_heap()

    def execute(self, requests: list[Any]) -> None:
        trace.mark("arrive")
        with PB_LOCK:  # the worker threads use pb_utils too (see triton_glue.PB_LOCK)
            for request in requests:
                self._admit(
                    read_inputs(request, PrefillRequest.SPECS), TritonSink(request, inband_errors=True)
                )

    def _admit(self, tensors: Tensors, call: TritonSink | None = None) -> None:
        """Admits one request: sent as a BLS call (`call`: its response sender) or over the
        request channel (no `call`: errors, like the result, go to its reply_to channel)."""
        channel: ChannelSink | None = None
        try:
            req = PrefillRequest.from_tensors(tensors)
            rid = req.request_id or ""
            trace.mark("p.arrive", rid)
            channel = self.channels.sink(req.reply_to, rid) if req.reply_to else None
            if call is None and channel is None:
                raise RequestError("a request over the request channel needs a reply_to")
            if self.engine.dead is not None:
                raise RequestError(f"prefill instance out of service: {self.engine.dead}")
            seq = self.engine.new_sequence(list(req.input_ids), req.sampling_params(), rid)
        except RequestError as e:
            refuse(str(e), call, channel)
            return
        if call is not None:
            if channel is not None:
                call.accepted()  # the result goes over the channel
            else:
                call.acknowledge()  # directly: the result follows on this call
        trace.mark("p.acked", rid)
        sink = channel if channel is not None else call
        assert sink is not None  # one of the two (checked above)
        self.worker.submit(PrefillJob(seq, sink, trace_id=rid))

    def finalize(self) -> None:
        self.door.close()
        self.worker.stop()
        self.channels.close()  # after the worker has ended every request
        self.sender.close()
        self.engine.close()
        self.pools.close()
        self.metric_registry.close()
