"""Triton python-backend model: the decode instance (decoupled, streaming).

Takes a DecodeRequest (input_ids: the prompt, first_token, kv_handle from prefill, and the
sampling inputs) or a DecodeCancel (backends.message). Pulls the KV named by the handle into its
own pool, then decodes with continuous batching over every request it holds, streaming
DecodeChunks (each has the tokens made since the previous one: one, unless its send fell behind;
see common/outbox.py) and, on the last one, finish_reason with the final flag. A DecodeRequest
with a `reply_to` token channel has its chunks sent over that channel instead (common/channel.py),
written straight from the engine loop; the orchestrator sends its requests and cancels over this
instance's request channel (common/door.py), and a BLS call with a reply_to is only answered
"accepted".
"""

from __future__ import annotations

import logging
from typing import Any

from backends.common import metrics as M
from backends.common import trace
from backends.common.channel import Channels, ChannelSink
from backends.common.cpu_priority import lower_priority
from backends.common.door import Door, refuse
from backends.common.outbox import Outbox
from backends.common.params import EngineParams, model_parameters
from backends.common.pools import RankPools
from backends.common.triton_glue import PB_LOCK, Metrics, TritonSink, freeze_startup_heap, read_inputs
from backends.decode.worker import DecodeJob, DecodeMetrics, DecodeWorker
from backends.message import ABORT, DecodeCancel, DecodeChunk, DecodeRequest, Tensors, read_decode_input
from backends.message.specs import DECODE_INPUTS
from engine.engine import LLMEngine
from engine.errors import RequestError
from engine.sequence import Sequence
from kv_transfer.config import ReceiverConfig
from kv_transfer.errors import KVHandleError
from kv_transfer.handle import KVHandle
from kv_transfer.instance import InstanceReceiver

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        trace.configure(args["model_name"])
        raw, root = model_parameters(args)
        params = EngineParams.from_parameters(raw)
        lower_priority(params.cpu_nice)  # first: every thread and worker started below inherits it
        engine_config = params.engine_config(root)
        # With several ranks rank 0 pulls every rank's KV (its heads of its stage's layers): the
        # pools are shared with it.
        self.pools = RankPools(engine_config, shared=engine_config.world_size > 1)
        self.engine = LLMEngine(engine_config, self.pools.pools)
        pools = self.pools.pools or [self.engine.pool]
        self.receiver = InstanceReceiver(params.kv_transport, pools, ReceiverConfig(), engine_config.pp_size)
        # Kept on self: a metric family must outlive its metrics.
        self.metric_registry = m = Metrics(args["model_name"], args["model_instance_name"])
        # Tokens go out from the outbox's thread: the decode loop never waits on a send.
        self.outbox = Outbox(name="decode-outbox")
        self.channels = Channels(args["model_name"], writer=True)  # the loop never waits on a socket
        self.worker = DecodeWorker(
            self.engine,
            self.receiver,
            DecodeMetrics(
                running=m.create_queued(M.RUNNING_SEQUENCES),
                waiting=m.create_queued(M.DECODE_QUEUE_DEPTH),
                free_blocks=m.create_queued(M.KV_FREE_BLOCKS),
                batch_size=m.create_queued(M.DECODE_BATCH_SIZE),
                kv_transfer_seconds=m.create_queued(M.KV_TRANSFER_SECONDS),
                kv_transfer_bytes=m.create_queued(M.KV_TRANSFER_BYTES),
                kv_transfer_failures=m.create_queued(M.KV_TRANSFER_FAILURES),
                cancelled=m.create_queued(M.CANCELLED),
            ),
            corked=self.channels.corked,
        )
        # The orchestrator's requests come over the request channel (BLS calls still work).
        self.door = Door(args["model_name"], self._admit)
        freeze_startup_heap()

    def execute(self, requests: list[Any]) -> None:
        with PB_LOCK:  # the worker threads use pb_utils too (see triton_glue.PB_LOCK)
            for request in requests:
                self._admit(read_inputs(request, DECODE_INPUTS), TritonSink(request, inband_errors=True))

    def _admit(self, tensors: Tensors, call: TritonSink | None = None) -> None:
        """Admits one request or cancel: sent as a BLS call (`call`: its response sender) or over
        the request channel (no `call`: errors, like the tokens, go to its reply_to channel; a
        cancel is not answered)."""
        channel: ChannelSink | None = None
        try:
            message = read_decode_input(tensors)
            if isinstance(message, DecodeCancel):
                self.worker.cancel(message.request_id)
                if call is not None:
                    call.send(DecodeChunk(finish_reason=ABORT), final=True)
                return
            if message.reply_to:
                channel = self.channels.sink(message.reply_to, message.request_id)
            elif call is None:
                raise RequestError("a request over the request channel needs a reply_to")
            if self.engine.dead is not None:
                raise RequestError(f"decode instance out of service: {self.engine.dead}")
            seq = self._sequence(message)
            handle = KVHandle.decode(message.kv_handle)
        except (RequestError, KVHandleError) as e:
            refuse(str(e), call, channel)
            return
        if channel is not None:
            if call is not None:
                call.accepted()  # the rest goes over the channel
            self.worker.submit(DecodeJob(seq, handle, channel))
            return
        assert call is not None
        call.acknowledge()  # directly: before any token of this request
        self.worker.submit(DecodeJob(seq, handle, self.outbox.sink(call)))

    def _sequence(self, req: DecodeRequest) -> Sequence:
        """The request's sequence as prefill left it: the prompt and the first token."""
        seq = self.engine.new_sequence(list(req.input_ids), req.sampling_params(), req.request_id)
        seq.output_ids.append(req.first_token)
        return seq

    def finalize(self) -> None:
        self.door.close()
        self.worker.stop()
        self.outbox.close()  # after the worker has ended every request: their final responses
        self.channels.close()
        self.receiver.close()
        self.engine.close()
        self.pools.close()
        self.metric_registry.close()
