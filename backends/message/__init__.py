"""The messages between client, orchestrator, prefill and decode, typed and in one place.

specs.py declares every model's tensors (what config.pbtxt says); codec.py derives each message's
to_tensors / from_tensors from those specs; phases.py holds the orchestrator <-> prefill/decode
messages and client.py the client <-> orchestrator/colocated ones. Models and the orchestrator
build and read tensors only through these classes.
"""

from backends.message.client import ClientChunk, ClientInputs, ClientRequest, check_parameters
from backends.message.codec import Message, StreamChunk, Tensors
from backends.message.phases import (
    ABORT,
    DecodeCancel,
    DecodeChunk,
    DecodeRequest,
    InbandError,
    PrefillRequest,
    PrefillResult,
    Sampling,
    read_decode_input,
)
from backends.message.specs import MODEL_INTERFACES, TensorSpec

__all__ = [
    "ABORT",
    "MODEL_INTERFACES",
    "ClientChunk",
    "ClientInputs",
    "ClientRequest",
    "DecodeCancel",
    "DecodeChunk",
    "DecodeRequest",
    "InbandError",
    "Message",
    "PrefillRequest",
    "PrefillResult",
    "Sampling",
    "StreamChunk",
    "TensorSpec",
    "Tensors",
    "check_parameters",
    "read_decode_input",
]
