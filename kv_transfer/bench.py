"""Benchmark: move N MiB of KV blocks between two processes and compare with a plain copy.

    python -m kv_transfer.bench --transport shm|tcp|cuda_ipc|nccl --mib 256

A prefill peer process (kv_transfer.peer) holds a pool with the blocks; this process is the decode
side and pulls them. Prints the transfer's GB/s (bytes / pull seconds, control round trips and the
acknowledgement included), a same-run baseline (numpy copy of the same number of bytes between two
preallocated host arrays for shm and tcp; a torch device-to-device copy for cuda_ipc and nccl), and
``ratio: X`` = transfer GB/s / baseline GB/s, both the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from engine.kv_cache import KVLayout, KVPool
from kv_transfer.config import ReceiverConfig
from kv_transfer.factory import create_receiver
from kv_transfer.handle import KVHandle
from kv_transfer.memcpy_tuning import is_tuned, tuned_environment
from kv_transfer.peer import logical_kv, spawn_prefill_peer


def _best(fn: Callable[[], float], repeats: int) -> list[float]:
    return [fn() for _ in range(repeats)]


def baseline_seconds(nbytes: int, device: str, repeats: int) -> list[float]:
    if device == "cpu":
        src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        dst = np.ones_like(src)

        def once() -> float:
            start = time.perf_counter()
            np.copyto(dst, src)
            return time.perf_counter() - start

        return _best(once, repeats)
    s = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    d = torch.empty_like(s)
    d.copy_(s)
    torch.cuda.synchronize()

    def once_gpu() -> float:
        start = time.perf_counter()
        d.copy_(s)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return _best(once_gpu, repeats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", choices=("shm", "tcp", "cuda_ipc", "nccl"), required=True)
    ap.add_argument("--mib", type=int, default=256, help="MiB of KV blocks per transfer")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument(
        "--placement",
        choices=("fifo", "scattered"),
        default="fifo",
        help="fifo: block ids as a fresh block manager hands them out; scattered: every other "
        "block, shuffled, on both sides",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--copy-workers", type=int, default=2, help="ReceiverConfig.copy_workers (1: no copy thread)"
    )
    ap.add_argument(
        "--device", default=None, help="pool device (default: cuda for cuda_ipc and nccl, else cpu)"
    )
    ap.add_argument(
        "--glibc-default",
        action="store_true",
        help="run with glibc's default memcpy tuning (see kv_transfer/memcpy_tuning.py)",
    )
    args = ap.parse_args(argv)
    if not args.glibc_default and not is_tuned():
        # Tunables are read at process start: run again with the serving stack's setting. The
        # baseline copy runs in that same process, under the same setting.
        cli = sys.argv[1:] if argv is None else argv
        os.execve(
            sys.executable, [sys.executable, "-m", "kv_transfer.bench", *cli], tuned_environment(os.environ)
        )
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")

    device = args.device or ("cuda" if args.transport in ("cuda_ipc", "nccl") else "cpu")
    prefill_device = device
    if args.transport == "nccl" and device.startswith("cuda"):
        # NCCL refuses two ranks on one GPU: the prefill side takes the second GPU.
        if torch.cuda.device_count() < 2:
            raise SystemExit("bench: nccl between two processes needs two GPUs (or --device cpu for gloo)")
        device, prefill_device = "cuda:0", "cuda:1"
    layout = KVLayout(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype)
    n = max(1, (args.mib << 20) // layout.bytes_per_block)
    pool_blocks = 2 * n
    nbytes = n * layout.bytes_per_block

    rng = random.Random(0)
    with spawn_prefill_peer() as peer:
        sid = peer.start(args.transport, layout, pool_blocks, seed=1, device=prefill_device)
        pool = KVPool.allocate(layout, pool_blocks, device)
        receiver = create_receiver(args.transport, pool, ReceiverConfig(copy_workers=args.copy_workers))
        seconds, reg_seconds = [], []
        try:
            for i in range(args.repeats + 1):  # the first pull warms up connections, groups and mappings
                scattered = args.placement == "scattered"
                got = peer(sid, "allocate", n=pool_blocks if scattered else n)["block_ids"]
                if scattered:
                    src_ids, spare = got[::2], got[1::2]
                    rng.shuffle(src_ids)
                    peer(sid, "free", block_ids=spare)
                    dst_ids = rng.sample(range(pool_blocks), n)
                else:
                    src_ids, dst_ids = got, list(range(n))
                start = time.perf_counter()
                reply = peer(sid, "register", block_ids=src_ids, num_tokens=n * layout.block_size)
                reg_seconds.append(time.perf_counter() - start)
                result = receiver.pull(KVHandle.decode(reply["handle"].encode()), dst_ids)
                if i == 0:
                    expected = logical_kv(layout, pool_blocks, 1)[:, :, src_ids]
                    if not torch.equal(pool.tensor[:, :, dst_ids].cpu(), expected):
                        raise SystemExit("bench: the pulled blocks differ from the prefill pool")
                    del expected
                else:
                    seconds.append(result.seconds)
            if peer.num_free(sid) != pool_blocks:
                raise SystemExit(
                    "bench: the prefill pool did not get its blocks back after the acknowledgements"
                )
        finally:
            receiver.close()
    base = baseline_seconds(nbytes, device, args.repeats)
    gbps = nbytes / min(seconds) / 1e9
    base_gbps = nbytes / min(base) / 1e9
    print(f"transport: {args.transport}  device: {prefill_device} -> {device}  placement: {args.placement}")
    print(f"moved: {nbytes / 2**20:.1f} MiB = {n} blocks of {layout.bytes_per_block} bytes ({layout})")
    print(
        f"transfer: {gbps:.2f} GB/s (best of {args.repeats}; median {nbytes / statistics.median(seconds) / 1e9:.2f})"
    )
    print(
        f"register (prefill side, checksum included): {statistics.median(reg_seconds[1:]) * 1e3:.1f} ms median"
    )
    print(
        f"baseline: {base_gbps:.2f} GB/s ({'numpy copy' if device == 'cpu' else 'torch device-to-device copy'},"
        f" median {nbytes / statistics.median(base) / 1e9:.2f})"
    )
    print(f"ratio: {gbps / base_gbps:.2f}")


if __name__ == "__main__":
    main()
