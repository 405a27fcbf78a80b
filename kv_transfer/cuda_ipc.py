"""cuda_ipc transport: same node, GPU. Decode copies blocks device-to-device out of the prefill pool.

The prefill pool is exported once per sender (``export`` op: engine.cuda_ipc_pool's description of
the pool's CUDA IPC memory handle, base64 fields in JSON, never pickled). Decode opens it once per sender instance and keeps the mapping.
A pull then names block ids only: decode checks the lease ("begin"), gathers the blocks into its own
pool with batched copies (one strided copy per run of consecutive ids on both sides when the runs are
few, otherwise one index_select + index_copy per layer, never a copy per block per layer), synchronizes
its stream, then acknowledges. Device indices in the export are the prefill process's numbering: both
processes must see the GPUs in the same order (same CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import socket
import threading

import torch

from engine.block_manager import BlockManager
from engine.cuda_ipc_pool import IpcError, export_pool, import_pool
from engine.kv_cache import KVPool
from kv_transfer.base import KVReceiver, KVSender, ProgressFn
from kv_transfer.blockcopy import matched_runs, planes_u8
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.control import Handler, Header
from kv_transfer.errors import KVProtocolError
from kv_transfer.handle import KVHandle, ShardRef
from kv_transfer.reshard import ShardPlan


def _require_cuda(pool: KVPool, side: str) -> None:
    if pool.device.type != "cuda":
        raise ValueError(f"the cuda_ipc {side} needs a pool on a CUDA device, got {pool.device}")


class CudaIpcSender(KVSender):
    transport = "cuda_ipc"

    def __init__(self, pool: KVPool, block_manager: BlockManager, config: SenderConfig) -> None:
        _require_cuda(pool, "sender")
        super().__init__(pool, block_manager, config)

    def _extra_handlers(self) -> dict[str, Handler]:
        return {"export": self._op_export}

    def _op_export(self, request: Header, conn: socket.socket) -> Header:
        self._check_instance(request)
        return {"ok": True, **export_pool(self.pool)}


def copy_blocks_cuda(
    src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int], plan: ShardPlan
) -> None:
    """Batched device-to-device gather of blocks from src into dst at the plan's layers and heads."""
    runs = matched_runs(src_ids, dst_ids)
    num_layers = src.shape[0]
    if plan.full and len(runs) <= num_layers:
        for s, d, c in runs:  # one strided copy per run covers every layer, K and V
            dst[:, :, d : d + c].copy_(src[:, :, s : s + c], non_blocking=True)
        return
    s_idx = torch.as_tensor(src_ids, dtype=torch.long, device=src.device)
    d_idx = torch.as_tensor(dst_ids, dtype=torch.long, device=dst.device)
    src_layers = range(num_layers)[plan.src_layers]
    dst_layers = range(dst.shape[0])[plan.dst_layers]
    for s_layer, d_layer in zip(src_layers, dst_layers, strict=True):  # bounded staging: a layer at a time
        part = src[s_layer].index_select(1, s_idx)
        if plan.full:
            dst[d_layer].index_copy_(1, d_idx, part.to(dst.device, non_blocking=True))
        else:
            dst[d_layer][:, d_idx, :, plan.dst_heads] = part[:, :, :, plan.src_heads].to(
                dst.device, non_blocking=True
            )


class CudaIpcReceiver(KVReceiver):
    transport = "cuda_ipc"

    def __init__(self, pool: KVPool, config: ReceiverConfig) -> None:
        _require_cuda(pool, "receiver")
        super().__init__(pool, config)
        self._imported: dict[tuple[str, str], torch.Tensor] = {}
        self._import_lock = threading.Lock()  # pulls may run on several threads

    def _source(self, handle: KVHandle, shard: ShardRef) -> torch.Tensor:
        key = (shard.address, shard.instance)
        with self._import_lock:
            src = self._imported.get(key)
            if src is None:
                layout = handle.layout_of(shard)
                export = self._request(shard, "export")
                try:
                    src = import_pool(export, layout.pool_shape(shard.pool_blocks), layout.torch_dtype)
                except IpcError as exc:
                    raise KVProtocolError(f"cuda_ipc export: {exc}") from None
                self._imported[key] = src
            return src

    def _pull_shard(
        self,
        handle: KVHandle,
        shard: ShardRef,
        plan: ShardPlan,
        dst_ids: list[int],
        on_progress: ProgressFn | None,
    ) -> tuple[int, bool]:
        self._request(shard, "begin")
        src = self._source(handle, shard)
        torch.cuda.set_device(self.pool.device)
        copy_blocks_cuda(src, shard.block_ids, self.pool.tensor, dst_ids, plan)
        nbytes = handle.layout_of(shard).bytes_per_block * handle.num_blocks
        if self.config.verify_checksum and shard.checksum is not None:
            # Optional on GPU: the hash runs on the host, so this costs a device-to-host copy.
            packed = src.index_select(2, torch.as_tensor(shard.block_ids, device=src.device)).cpu()
            actual = self._copier.checksum(planes_u8(packed), list(range(handle.num_blocks)))
            verified = self._verify(shard, actual)
        else:
            verified = False
        if on_progress is not None:
            on_progress(nbytes, nbytes)
        return nbytes, verified

    def _close_transport(self) -> None:
        self._imported.clear()
