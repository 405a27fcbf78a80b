"""The only code that touches triton_python_backend_utils: sinks, inputs, metrics.

Imported from inside the python backend's stub process only (pb_utils exists nowhere else).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.common.interface import TensorSpec
from backends.common.sink import Outputs

log = logging.getLogger(__name__)


class TritonSink:
    """ResponseSink over a decoupled request's response sender (thread-safe, closes once)."""

    def __init__(self, request: Any) -> None:
        self._sender = request.get_response_sender()
        self._lock = threading.Lock()
        self._closed = False

    def send(self, outputs: Outputs, final: bool) -> None:
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in outputs.items()]
        self._send(pb_utils.InferenceResponse(output_tensors=tensors), final)

    def error(self, message: str) -> None:
        self._send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), True)

    def is_cancelled(self) -> bool:
        try:
            return bool(self._sender.is_cancelled())
        except Exception:
            return False

    def _send(self, response: Any, final: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = final
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            try:
                self._sender.send(response, flags=flags)
            except Exception as exc:  # the client is gone; nothing else to do for this request
                log.info("could not send a response: %s", exc)
                self._closed = True


def read_inputs(request: Any, specs: Iterable[TensorSpec]) -> dict[str, np.ndarray]:
    """The request's tensors that are present, as numpy arrays (BYTES as object arrays)."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            out[spec.name] = tensor.as_numpy()
    return out


class Metrics:
    """Creates metric families once per model and metrics labelled with the model and instance."""

    def __init__(self, model: str, instance: str) -> None:
        self.labels = {"model": model, "instance": instance}
        self._families: dict[str, Any] = {}

    def _family(self, name: str, description: str, kind: Any) -> Any:
        if name not in self._families:
            self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        return self._families[name]

    def gauge(self, name: str, description: str) -> Any:
        return self._family(name, description, pb_utils.MetricFamily.GAUGE).Metric(labels=self.labels)

    def counter(self, name: str, description: str) -> Any:
        return self._family(name, description, pb_utils.MetricFamily.COUNTER).Metric(labels=self.labels)

    def histogram(self, name: str, description: str, buckets: Iterable[float]) -> Any:
        family = self._family(name, description, pb_utils.MetricFamily.HISTOGRAM)
        return family.Metric(labels=self.labels, buckets=list(buckets))
