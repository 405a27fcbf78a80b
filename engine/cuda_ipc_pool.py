"""A KV pool's CUDA memory shared with another process (CUDA IPC), without pickle.

``export_pool`` describes the pool's storage by its CUDA IPC memory handle (from
``UntypedStorage._share_cuda_``, the mechanism torch.multiprocessing uses) as a JSON-able dict,
base64 for the bytes; ``import_pool`` opens it in another process as a tensor on the same memory.
Two users: the cuda_ipc KV transfer (decode reads a prefill pool) and tensor parallelism on CUDA
(rank 0 allocates every rank's pool, a worker rank opens its own). Device indices are the
exporting process's numbering: both processes must see the GPUs in the same order.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from engine.kv_cache import KVPool, dtype_name


class IpcError(ValueError):
    """An export that is malformed or does not match the pool it should hold."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def export_pool(pool: KVPool) -> dict[str, Any]:
    """The pool's memory as an IPC description. A fresh share per call: each gets its own slot in
    torch's producer-side reference counter, which the importing process releases when it drops
    the mapping."""
    t = pool.tensor
    dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = t.untyped_storage()._share_cuda_()
    return {
        "device": int(dev),
        "handle": _b64(handle),
        "storage_size": int(size),
        "storage_offset_bytes": int(offset),
        "ref_counter_handle": _b64(rc_handle),
        "ref_counter_offset": int(rc_offset),
        # passed back exactly as torch returned it (bytes, or None)
        "event_handle": None if ev_handle is None else _b64(ev_handle),
        "event_sync_required": bool(ev_sync),
        "tensor_offset": int(t.storage_offset()),
        "shape": list(t.shape),
        "dtype": pool.layout.dtype,
    }


def import_pool(export: dict[str, Any], expected_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Opens an exported pool as a tensor of this process (validated against the handle's layout)."""
    try:
        fields: dict[str, Any] = {
            "device": int(export["device"]),
            "handle": base64.b64decode(export["handle"], validate=True),
            "size": int(export["storage_size"]),
            "offset": int(export["storage_offset_bytes"]),
            "rc_handle": base64.b64decode(export["ref_counter_handle"], validate=True),
            "rc_offset": int(export["ref_counter_offset"]),
            "ev_handle": None
            if export["event_handle"] is None
            else base64.b64decode(export["event_handle"], validate=True),
            "ev_sync": bool(export["event_sync_required"]),
            "tensor_offset": int(export["tensor_offset"]),
        }
        shape = tuple(int(x) for x in export["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IpcError(f"malformed cuda_ipc export: {exc!r}") from None
    if export.get("dtype") != dtype_name(dtype):
        raise IpcError(f"exported pool dtype {export.get('dtype')!r} does not match the handle's")
    if shape != expected_shape:
        raise IpcError(f"exported pool shape {shape} does not match the handle's {expected_shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    if (fields["tensor_offset"] + numel) * itemsize > fields["size"]:
        raise IpcError("exported storage is smaller than the pool it claims to hold")
    torch.cuda.init()
    storage = torch.UntypedStorage._new_shared_cuda(
        fields["device"],
        fields["handle"],
        fields["size"],
        fields["offset"],
        fields["rc_handle"],
        fields["rc_offset"],
        fields["ev_handle"],
        fields["ev_sync"],
    )
    # The same reconstruction torch.multiprocessing uses for CUDA tensors received from another process.
    stride = torch.empty(shape, dtype=dtype, device="meta").stride()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    tensor = torch._utils._rebuild_tensor(typed, fields["tensor_offset"], shape, stride)
    return tensor
