"""The python backend's API (triton_python_backend_utils) for the models: sinks, inputs, metrics.

Imported from inside the python backend's stub process only (pb_utils exists nowhere else). The
model.py files and orchestrator/bls.py (BLS calls) use pb_utils too; everything else in backends/
is free of it and testable without a server.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.common import trace
from backends.common.metrics import MetricSpec, coalesce
from backends.common.queues import take_all
from backends.common.stub_lock import PB_LOCK
from backends.message import InbandError, Message, Tensors, TensorSpec

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05
# Queued metric updates reach the server within this; a Prometheus scrape is seconds apart.
METRICS_FLUSH_S = 0.025


def freeze_startup_heap() -> None:
    """Takes what start-up allocated (modules, weights, the engine) out of the garbage collector's
    view: it lives as long as the process, and otherwise every full collection re-scans it
    between steps. Called at the end of initialize()."""
    gc.collect()
    gc.freeze()


def response_tensors(message: Message, batch_dim: bool = False) -> list[Any]:
    """A message's output tensors; with `batch_dim` (a model with max_batch_size >= 1) each gets a
    leading batch dimension of one."""
    return [
        pb_utils.Tensor(name, np.ascontiguousarray(arr[np.newaxis] if batch_dim else arr))
        for name, arr in message.to_tensors().items()
    ]


class TritonSink:
    """ResponseSink over a decoupled request's response sender (thread-safe, closes once)."""

    def __init__(self, request: Any, inband_errors: bool = False, batch_dim: bool = False) -> None:
        self._sender = request.get_response_sender()
        self._inband = inband_errors
        self._batch_dim = batch_dim  # a model with max_batch_size >= 1: outputs get a batch of one
        self._lock = threading.Lock()
        self._closed = False
        self._cancelled = False
        # A request is not asked about right away: the first real check (an IPC round trip) comes
        # CANCEL_POLL_S after it arrived, off the path to its first token.
        self._checked_at = time.monotonic()

    def send(self, message: Message, final: bool) -> None:
        self._send(
            pb_utils.InferenceResponse(output_tensors=response_tensors(message, self._batch_dim)), final
        )

    def acknowledge(self) -> None:
        """Sends an empty, non-final response: "accepted".

        A decoupled BLS exec() (2.51) returns only when the callee's first response arrives, and
        the orchestrator calls it under PB_LOCK. Without an immediate first response each call
        would hold the lock for a whole prefill: the orchestrator's calls ran one at a time
        (prefill batches of one request, token streaming paused meanwhile), and a prefill
        waiting for leased blocks waited on the decode calls queued behind it.
        """
        self._send(pb_utils.InferenceResponse(output_tensors=[]), final=False)

    def accepted(self) -> None:
        """Sends an empty, final response: the request is accepted and will be answered on its
        token channel (backends/common/channel.py)."""
        self._send(pb_utils.InferenceResponse(output_tensors=[]), final=True)

    def error(self, message: str) -> None:
        if self._inband:  # for models called through BLS (see message.phases)
            self.send(InbandError(error_message=message), final=True)
        else:
            self._send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), True)

    def is_cancelled(self) -> bool:
        # Each real check is an IPC round trip to the server: ask at most every CANCEL_POLL_S.
        now = time.monotonic()
        if self._cancelled or now - self._checked_at < CANCEL_POLL_S:
            return self._cancelled
        self._checked_at = now
        try:
            with PB_LOCK:
                self._cancelled = bool(self._sender.is_cancelled())
        except Exception:
            pass
        return self._cancelled

    def _send(self, response: Any, final: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = final
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            try:
                with PB_LOCK:
                    trace.mark("send")
                    self._sender.send(response, flags=flags)
                    trace.mark("sent")
            except Exception as exc:  # the client is gone; nothing else to do for this request
                log.info("could not send a response: %s", exc)
                self._closed = True


class RequestsRefused(Exception):
    """Raised from a decoupled model's execute() once every request of the call was refused (and
    answered with its own error response), so that Triton counts them as failures."""


def count_refusals(refused: int, total: int) -> None:
    """Makes Triton count a call's refused requests as failures (nv_inference_request_failure).

    The 2.51 python backend reports a decoupled model's request statistics when execute() returns,
    as a success unless execute() raised; what the response sender sends does not count. So once
    every request of the call has been answered with its error (a final response, which closes
    it: the backend then sends nothing more for it), raising marks them failed. The stub logs the
    exception; the client sees only its own error response. A call with some requests accepted
    cannot fail only the others (the backend reports one status per call): they count as
    successes. The entry models have no dynamic batcher, so each call holds one request.
    """
    if total and refused == total:
        raise RequestsRefused(f"{refused} request(s) refused; each was answered with its error")


def fail_unary_call(errors: list[str | None], total: int) -> None:
    """Makes Triton count a unary call whose requests all failed as failures.

    A unary model's error responses returned from execute() count as successes in 2.51, and
    answering through the response sender before raising crashes the server (it answers the
    request a second time). So nothing is sent: execute() raises, and the backend answers each
    request with "Failed to process the request(s) for model ..., message: RequestsRefused:" and
    this error, then Python's "At:" lines.
    """
    if total and len(errors) == total:
        raise RequestsRefused("; ".join(e or "failed" for e in dict.fromkeys(errors)))


def read_parameters(request: Any) -> dict[str, Any]:
    """The request's parameters (a JSON object in 2.51's python backend)."""
    raw = request.parameters()
    parsed = json.loads(raw) if isinstance(raw, str) and raw else {}
    return parsed if isinstance(parsed, dict) else {}


def read_inputs(request: Any, specs: Iterable[TensorSpec]) -> Tensors:
    """The request's tensors that are present, as numpy arrays (BYTES as object arrays)."""
    out: Tensors = {}
    for spec in specs:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            out[spec.name] = tensor.as_numpy()
    return out


class _LockedMetric:
    """A pb_utils Metric whose updates (IPC to the server) take PB_LOCK; no-ops once closed."""

    def __init__(self, metric: Any) -> None:
        self._metric: Any = metric
        self._value: float | None = None

    def set(self, value: float) -> None:
        if value == self._value:  # engine loops set their gauges every step; most don't change
            return
        with PB_LOCK:
            if self._metric is not None:
                self._metric.set(value)
                self._value = value

    def increment(self, value: float) -> None:
        with PB_LOCK:
            if self._metric is not None:
                self._metric.increment(value)

    def observe(self, value: float) -> None:
        with PB_LOCK:
            if self._metric is not None:
                self._metric.observe(value)

    def close(self) -> None:
        with PB_LOCK:
            self._metric = None


class _QueuedMetric:
    """A metric whose updates the caller only queues: the Metrics writer thread makes the IPC.
    For engine loops, whose steps must not wait on a round trip to the server for a metric."""

    def __init__(
        self, metric: _LockedMetric, ops: queue.SimpleQueue[tuple[_LockedMetric, str, float] | None]
    ) -> None:
        self._metric = metric
        self._ops = ops
        self._value: float | None = None

    def set(self, value: float) -> None:
        if value != self._value:  # engine loops set their gauges every step; most don't change
            self._value = value
            self._ops.put((self._metric, "set", value))

    def increment(self, value: float) -> None:
        self._ops.put((self._metric, "increment", value))

    def observe(self, value: float) -> None:
        self._ops.put((self._metric, "observe", value))


class Metrics:
    """Creates metric families once per model and metrics labelled with the model and instance.

    Call close() in finalize(): a metric family destroyed later, when the stub tears the model
    object down, sends its last message over shared memory that is already gone, and the stub
    segfaults on its way out (2.51, every server stop).
    """

    def __init__(self, model: str, instance: str) -> None:
        self.labels = {"model": model, "instance": instance}
        self._families: dict[str, Any] = {}
        self._metrics: list[_LockedMetric] = []
        self._ops: queue.SimpleQueue[tuple[_LockedMetric, str, float] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def close(self) -> None:
        """Applies the queued updates, then destroys every metric and family now, while the stub
        can still talk to the server."""
        if self._writer is not None:
            self._ops.put(None)
            self._writer.join(timeout=5.0)
        with PB_LOCK:
            for metric in self._metrics:
                metric.close()
            self._metrics.clear()
            self._families.clear()

    def _write(self) -> None:
        """The writer thread: at most every METRICS_FLUSH_S, applies the updates queued since,
        coalesced (one IPC per gauge and counter, one per observation), under one PB_LOCK, until
        close(). An engine loop updates metrics every step; waking per step cost decode's
        process a thread wake-up and a GIL hand-off each."""
        while True:
            ops = take_all(self._ops)
            closing = None in ops
            with PB_LOCK:
                for metric, name, value in coalesce(op for op in ops if op is not None):
                    getattr(metric, name)(value)
            if closing:
                return
            time.sleep(METRICS_FLUSH_S)

    def _track(self, metric: Any) -> _LockedMetric:
        locked = _LockedMetric(metric)
        self._metrics.append(locked)
        return locked

    def _family(self, name: str, description: str, kind: Any) -> Any:
        if name not in self._families:
            self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        return self._families[name]

    def create(self, spec: MetricSpec) -> _LockedMetric:
        """This model instance's metric of a catalog family (backends.common.metrics); each
        update is an IPC round trip to the server, made by the caller."""
        kinds = {
            "gauge": pb_utils.MetricFamily.GAUGE,
            "counter": pb_utils.MetricFamily.COUNTER,
            "histogram": pb_utils.MetricFamily.HISTOGRAM,
        }
        family = self._family(spec.name, spec.description, kinds[spec.kind])
        if spec.kind == "histogram":
            return self._track(family.Metric(labels=self.labels, buckets=list(spec.buckets)))
        return self._track(family.Metric(labels=self.labels))

    def create_queued(self, spec: MetricSpec) -> _QueuedMetric:
        """Like create(), for an engine loop: an update is queued and made by this Metrics' writer
        thread (started with the first such metric), so the loop never waits for the server. The
        metric lags its updates by up to METRICS_FLUSH_S and the writer's turn; tests poll it."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="metrics-writer", daemon=True)
            self._writer.start()
        return _QueuedMetric(self.create(spec), self._ops)
