"""Block copies and the packed-bytes checksum, and the control channel's framing and errors."""

from __future__ import annotations

import random
import socket
import struct

import pytest
import torch
import xxhash

from engine.kv_cache import KVLayout, KVPool
from kv_transfer.blockcopy import PlaneCopier, combine_digests, matched_runs, planes_u8
from kv_transfer.control import ControlClient, ControlServer, recv_header, send_header
from kv_transfer.errors import KVLeaseExpiredError, KVProtocolError, KVTransferError


def reference_checksum(packed: torch.Tensor) -> str:
    """The checksum as documented: xxh3_64 per (layer, K/V) plane of the packed bytes, then of the digests."""
    planes = packed.reshape(packed.shape[0] * 2, -1).view(torch.uint8).numpy()
    return combine_digests([xxhash.xxh3_64(p.tobytes()).intdigest() for p in planes])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("workers", [1, 2])
def test_copy_matches_gather_scatter_and_checksum_matches_definition(dtype: str, workers: int) -> None:
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4, dtype=dtype)
    src = KVPool.allocate(layout, 40)
    src.tensor.copy_(torch.randn(src.tensor.shape))
    dst = KVPool.allocate(layout, 50)
    rng = random.Random(dtype)
    src_ids = rng.sample(range(40), 25)
    dst_ids = [*range(10, 20), *rng.sample(range(20, 50), 15)]
    copier = PlaneCopier(workers)
    try:
        got = copier.copy(planes_u8(src.tensor), planes_u8(dst.tensor), matched_runs(src_ids, dst_ids), True)
        expected = reference_checksum(src.gather(src_ids))
        assert got == expected
        assert copier.checksum(planes_u8(src.tensor), src_ids) == expected
        assert torch.equal(dst.gather(dst_ids), src.gather(src_ids))
        untouched = sorted(set(range(50)) - set(dst_ids))
        assert torch.count_nonzero(dst.gather(untouched)) == 0
        # one changed element changes the checksum
        src.tensor[2, 1, src_ids[7], 3, 1, 5] += 1
        assert copier.checksum(planes_u8(src.tensor), src_ids) != expected
    finally:
        copier.close()


def test_matched_runs() -> None:
    assert matched_runs([5, 6, 7, 1, 2], [0, 1, 2, 3, 9]) == [(5, 0, 3), (1, 3, 1), (2, 9, 1)]
    with pytest.raises(ValueError):
        matched_runs([1], [1, 2])


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_control_server_replies_errors_and_drops_garbage() -> None:
    def expired(request: dict, conn: socket.socket) -> dict:
        raise KVLeaseExpiredError("lease x expired")

    def boom(request: dict, conn: socket.socket) -> dict:
        raise RuntimeError("bug")

    server = ControlServer(
        "127.0.0.1", 0, {"echo": lambda r, c: {"ok": True, "x": r["x"]}, "exp": expired, "boom": boom}, 5.0
    )
    client = ControlClient(5.0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert client.request("127.0.0.1", server.port, {"op": "echo", "x": [1, "a"]})["x"] == [1, "a"]
        with pytest.raises(KVLeaseExpiredError, match="lease x expired"):
            client.request("127.0.0.1", server.port, {"op": "exp"})
        with pytest.raises(KVProtocolError, match="unknown control op"):
            client.request("127.0.0.1", server.port, {"op": "nope"})
        with pytest.raises(KVTransferError, match="boom failed on the prefill side"):
            client.request("127.0.0.1", server.port, {"op": "boom"})
        # bad magic: the server closes the connection instead of answering
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(struct.pack("!4sI", b"HTTP", 2) + b"{}")
            assert closed_by_peer(raw)
        # JSON that is not an object
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(struct.pack("!4sI", b"KVT1", 2) + b"[]")
            assert closed_by_peer(raw)
        # the server still serves after all that
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            send_header(raw, {"op": "echo", "x": 1})
            assert recv_header(raw) == {"ok": True, "x": 1}
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("heads", ["full", "half"])
def test_batched_device_copy_logic(scattered: bool, heads: str) -> None:
    """cuda_ipc's gather (run copies or per-layer index ops), exercised on CPU tensors."""
    from kv_transfer.cuda_ipc import copy_blocks_cuda
    from kv_transfer.reshard import Place, plan_pull

    layout = KVLayout(num_layers=3, num_kv_heads=4, head_dim=8, block_size=2, dtype="float16")
    src = KVPool.allocate(layout, 30)
    src.tensor.copy_(torch.randn(src.tensor.shape))
    rng = random.Random(f"{scattered}{heads}")
    src_ids = rng.sample(range(30), 12) if scattered else list(range(5, 17))
    dst_ids = rng.sample(range(20), 12) if scattered else [*range(0, 6), *range(10, 16)]
    if heads == "full":
        plan = plan_pull(4, 3, 1, 1, Place())[0]
        dst = KVPool.allocate(layout, 20)
        copy_blocks_cuda(src.tensor, src_ids, dst.tensor, dst_ids, plan)
        assert torch.equal(dst.gather(dst_ids), src.gather(src_ids))
    else:
        plan = plan_pull(4, 3, 1, 1, Place(1, 2))[0]  # decode rank 1 of 2 takes heads 2..4
        half = KVLayout(3, 2, 8, 2, "float16")
        dst = KVPool.allocate(half, 20)
        copy_blocks_cuda(src.tensor, src_ids, dst.tensor, dst_ids, plan)
        assert torch.equal(dst.gather(dst_ids), src.gather(src_ids)[:, :, :, :, 2:4])
    untouched = sorted(set(range(20)) - set(dst_ids))
    assert torch.count_nonzero(dst.gather(untouched)) == 0


def test_batched_device_copy_of_a_stages_layers() -> None:
    """cuda_ipc's gather into a decode stage: prefill PP 1 (3 layers) -> decode stage 1 of 2."""
    from kv_transfer.cuda_ipc import copy_blocks_cuda
    from kv_transfer.reshard import Place, plan_pull

    layout = KVLayout(num_layers=3, num_kv_heads=4, head_dim=8, block_size=2, dtype="float16")
    src = KVPool.allocate(layout, 10)
    src.tensor.copy_(torch.randn(src.tensor.shape))
    (plan,) = plan_pull(4, 3, 1, 1, Place(pp_rank=1, pp_size=2))  # stage 1 holds layer 2
    dst = KVPool.allocate(KVLayout(1, 4, 8, 2, "float16"), 10)
    copy_blocks_cuda(src.tensor, [1, 2, 3], dst.tensor, [7, 8, 9], plan)
    assert torch.equal(dst.gather([7, 8, 9]), src.gather([1, 2, 3])[2:3])


def test_malformed_cuda_ipc_exports_are_refused_before_opening() -> None:
    from engine.cuda_ipc_pool import IpcError, import_pool

    good = {
        "ok": True,
        "device": 0,
        "handle": "AAAA",
        "storage_size": 4096,
        "storage_offset_bytes": 0,
        "ref_counter_handle": "AAAA",
        "ref_counter_offset": 0,
        "event_handle": None,
        "event_sync_required": False,
        "tensor_offset": 0,
        "shape": [1, 2, 4, 4, 2, 8],
        "dtype": "float16",
    }
    shape = (1, 2, 4, 4, 2, 8)
    for bad, message in (
        ({"handle": "not base64!"}, "malformed"),
        ({"shape": "x"}, "malformed"),
        ({"storage_size": 100}, "smaller than the pool"),
        ({"shape": [1, 2, 5, 4, 2, 8]}, "does not match"),
        ({"dtype": "float32"}, "dtype"),
    ):
        with pytest.raises(IpcError, match=message):
            import_pool({**good, **bad}, shape, torch.float16)
    reduced = dict(good)
    del reduced["tensor_offset"]
    with pytest.raises(IpcError, match="malformed"):
        import_pool(reduced, shape, torch.float16)
