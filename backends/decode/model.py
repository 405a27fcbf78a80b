"""Triton python-backend model: the decode instance (decoupled, streaming).

Takes a DecodeRequest (input_ids: the prompt, first_token, kv_handle from prefill, and the
sampling inputs) or a DecodeCancel (backends.message). Pulls the KV named by the handle into its
own pool, then decodes with continuous batching over every request it holds, streaming
DecodeChunks (each has the tokens made since the previous one: one, unless its send fell behind;
see common/outbox.py) and, on the last one, finish_reason with the final flag. A DecodeRequest
with a `reply_to` token channel is answered "accepted" on the call, and its chunks go over the
channel instead (common/channel.py), written straight from the engine loop.
"""

from __future__ import annotations

import logging
from typing import Any

from backends.common import metrics as M
from backends.common import trace
from backends.common.channel import Channels
from backends.common.outbox import Outbox
from backends.common.params import EngineParams, model_parameters
from backends.common.pools import RankPools
from backends.common.triton_glue import PB_LOCK, Metrics, TritonSink, freeze_startup_heap, read_inputs
from backends.decode.worker import DecodeJob, DecodeMetrics, DecodeWorker
from backends.message import ABORT, DecodeCancel, DecodeChunk, DecodeRequest, read_decode_input
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
        self.channels = Channels(args["model_name"])
        self.worker = DecodeWorker(
            self.engine,
            self.receiver,
            DecodeMetrics(
                running=m.create(M.RUNNING_SEQUENCES),
                waiting=m.create(M.DECODE_QUEUE_DEPTH),
                free_blocks=m.create(M.KV_FREE_BLOCKS),
                batch_size=m.create(M.DECODE_BATCH_SIZE),
                kv_transfer_seconds=m.create(M.KV_TRANSFER_SECONDS),
                kv_transfer_bytes=m.create(M.KV_TRANSFER_BYTES),
                kv_transfer_failures=m.create(M.KV_TRANSFER_FAILURES),
                cancelled=m.create(M.CANCELLED),
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
                message = read_decode_input(read_inputs(request, DECODE_INPUTS))
                if self.engine.dead is not None and isinstance(message, DecodeRequest):
                    raise RequestError(f"decode instance out of service: {self.engine.dead}")
                if isinstance(message, DecodeCancel):
                    self.worker.cancel(message.request_id)
                    sink.send(DecodeChunk(finish_reason=ABORT), final=True)
                    continue
                seq = self._sequence(message)
                handle = KVHandle.decode(message.kv_handle)
                channel = (
                    self.channels.sink(message.reply_to, message.request_id) if message.reply_to else None
                )
            except (RequestError, KVHandleError) as e:
                sink.error(str(e))
                continue
            if channel is not None:
                sink.accepted()  # the rest goes over the channel
                self.worker.submit(DecodeJob(seq, handle, channel))
                continue
            sink.acknowledge()  # directly: before any token of this request
            self.worker.submit(DecodeJob(seq, handle, self.outbox.sink(sink)))

    def _sequence(self, req: DecodeRequest) -> Sequence:
        """The request's sequence as prefill left it: the prompt and the first token."""
        seq = self.engine.new_sequence(list(req.input_ids), req.sampling_params(), req.request_id)
        seq.output_ids.append(req.first_token)
        return seq

    def finalize(self) -> None:
        self.worker.stop()
        self.outbox.close()  # after the worker has ended every request: their final responses
        self.channels.close()
        self.receiver.close()
        self.engine.close()
        self.pools.close()
        self.metric_registry.close()
