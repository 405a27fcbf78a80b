"""Layout compatibility and tensor-parallel resharding of KV heads between prefill and decode.

Prefill rank i of p holds heads [i*H/p, (i+1)*H/p); decode rank r of q needs [r*H/q, (r+1)*H/q).
A decode rank reads every prefill shard that overlaps its range and places the overlap. The decode
ranks reading one shard are its "readers"; the shard's lease ends when all of them acknowledged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.kv_cache import KVLayout
from kv_transfer.errors import KVLayoutMismatchError


class ShardPlan(NamedTuple):
    """What one decode rank takes from one prefill shard (head slices are rank-local)."""

    shard_rank: int
    src_heads: slice  # within the prefill shard's heads
    dst_heads: slice  # within this decode rank's heads
    full: bool  # the whole shard maps onto the whole local head range
    reader: int  # this rank's index among the shard's readers
    readers: int


def check_compatible(remote: KVLayout, remote_tp: int, local: KVLayout, local_tp: int) -> None:
    """Raises KVLayoutMismatchError naming every difference; remote.num_kv_heads is the model total."""
    problems = [
        f"{name}: prefill {getattr(remote, name)} vs decode {getattr(local, name)}"
        for name in ("dtype", "head_dim", "block_size", "num_layers")
        if getattr(remote, name) != getattr(local, name)
    ]
    total = local.num_kv_heads * local_tp
    if remote.num_kv_heads != total:
        problems.append(
            f"num_kv_heads: prefill {remote.num_kv_heads} in total vs decode {local.num_kv_heads} x TP {local_tp} = {total}"
        )
    if remote.num_kv_heads % remote_tp:
        problems.append(f"prefill TP {remote_tp} does not divide {remote.num_kv_heads} KV heads")
    if problems:
        raise KVLayoutMismatchError("KV layout mismatch, nothing copied: " + "; ".join(problems))


def plan_pull(total_heads: int, src_tp: int, dst_tp: int, dst_rank: int) -> list[ShardPlan]:
    """The shards decode rank dst_rank reads, and which head slices go where."""
    src_w, dst_w = total_heads // src_tp, total_heads // dst_tp
    lo, hi = dst_rank * dst_w, (dst_rank + 1) * dst_w
    plans = []
    for i in range(src_tp):
        s_lo, s_hi = i * src_w, (i + 1) * src_w
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a >= b:
            continue
        readers = [r for r in range(dst_tp) if max(r * dst_w, s_lo) < min((r + 1) * dst_w, s_hi)]
        plans.append(
            ShardPlan(
                shard_rank=i,
                src_heads=slice(a - s_lo, b - s_lo),
                dst_heads=slice(a - lo, b - lo),
                full=(a, b) == (s_lo, s_hi) == (lo, hi),
                reader=readers.index(dst_rank),
                readers=len(readers),
            )
        )
    return plans


def place(dst: torch.Tensor, dst_ids: torch.Tensor, packed: torch.Tensor, plan: ShardPlan) -> None:
    """Writes packed[..., src_heads, :] of a shard into dst's blocks dst_ids at dst_heads."""
    part = packed[:, :, :, :, plan.src_heads]
    dst[:, :, dst_ids, :, plan.dst_heads] = part.to(device=dst.device)
