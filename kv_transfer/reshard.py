"""Layout compatibility, and resharding of KV heads and layers between prefill and decode.

A prefill shard (stage p of pp, tensor-parallel rank i of tp) holds the layers of stage p and heads
[i*H/tp, (i+1)*H/tp). A decode rank (stage s of its own pp, rank r of its own tp) needs the layers
of its stage and heads [r*H/q, (r+1)*H/q). It reads every prefill shard that overlaps both and
places the overlap. The decode ranks reading one shard are its "readers"; the shard's lease ends
when all of them have acknowledged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.kv_cache import KVLayout
from engine.sharding import Stage
from kv_transfer.errors import KVLayoutMismatchError


class Place(NamedTuple):
    """A decode rank's place in its instance: its tensor-parallel rank and pipeline stage."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1


class ShardPlan(NamedTuple):
    """What one decode rank takes from one prefill shard (slices are local to each side)."""

    shard_index: int  # into the handle's shards (stage-major)
    src_heads: slice  # within the prefill shard's heads
    dst_heads: slice  # within this decode rank's heads
    src_layers: slice  # within the prefill shard's layers
    dst_layers: slice  # within this decode rank's layers
    full: bool  # the whole shard maps onto the whole of this rank's pool
    reader: int  # this rank's index among the shard's readers
    readers: int


def check_compatible(remote: KVLayout, remote_tp: int, remote_pp: int, local: KVLayout, at: Place) -> None:
    """Raises KVLayoutMismatchError naming every difference. `remote` is the model's layout (all
    layers, all heads); `local` this decode rank's pool (its stage's layers, its rank's heads)."""
    problems = [
        f"{name}: prefill {getattr(remote, name)} vs decode {getattr(local, name)}"
        for name in ("dtype", "head_dim", "block_size")
        if getattr(remote, name) != getattr(local, name)
    ]
    total = local.num_kv_heads * at.tp_size
    if remote.num_kv_heads != total:
        problems.append(
            f"num_kv_heads: prefill {remote.num_kv_heads} in total vs decode {local.num_kv_heads} x TP {at.tp_size} = {total}"
        )
    if remote.num_kv_heads % remote_tp:
        problems.append(f"prefill TP {remote_tp} does not divide {remote.num_kv_heads} KV heads")
    if remote.num_layers < max(remote_pp, at.pp_size):
        problems.append(f"{remote.num_layers} layers cannot be split over PP {max(remote_pp, at.pp_size)}")
    else:
        mine = len(Stage.of(remote.num_layers, at.pp_rank, at.pp_size).layers)
        if local.num_layers != mine:
            problems.append(
                f"num_layers: decode stage {at.pp_rank} of {at.pp_size} holds {local.num_layers} layers, "
                f"the prefill model's {remote.num_layers} layers give it {mine}"
            )
    if problems:
        raise KVLayoutMismatchError("KV layout mismatch, nothing copied: " + "; ".join(problems))


def _overlap(lo: int, hi: int, s_lo: int, s_hi: int) -> tuple[int, int]:
    return max(lo, s_lo), min(hi, s_hi)


def plan_pull(total_heads: int, total_layers: int, src_tp: int, src_pp: int, at: Place) -> list[ShardPlan]:
    """The prefill shards (of a src_tp x src_pp prefill instance) decode rank `at` reads, and which
    heads and layers go where."""
    layers = total_layers
    src_w, dst_w = total_heads // src_tp, total_heads // at.tp_size
    lo, hi = at.tp_rank * dst_w, (at.tp_rank + 1) * dst_w
    mine = Stage.of(layers, at.pp_rank, at.pp_size).layers
    plans = []
    for p in range(src_pp):
        theirs = Stage.of(layers, p, src_pp).layers
        la, lb = _overlap(mine.start, mine.stop, theirs.start, theirs.stop)
        if la >= lb:
            continue
        for i in range(src_tp):
            s_lo, s_hi = i * src_w, (i + 1) * src_w
            a, b = _overlap(lo, hi, s_lo, s_hi)
            if a >= b:
                continue
            readers = [
                (stage, r)
                for stage in range(at.pp_size)
                for r in range(at.tp_size)
                if _reads(layers, at.pp_size, stage, theirs)
                and max(r * dst_w, s_lo) < min((r + 1) * dst_w, s_hi)
            ]
            plans.append(
                ShardPlan(
                    shard_index=p * src_tp + i,
                    src_heads=slice(a - s_lo, b - s_lo),
                    dst_heads=slice(a - lo, b - lo),
                    src_layers=slice(la - theirs.start, lb - theirs.start),
                    dst_layers=slice(la - mine.start, lb - mine.start),
                    full=(a, b) == (s_lo, s_hi) == (lo, hi)
                    and (la, lb) == (theirs.start, theirs.stop) == (mine.start, mine.stop),
                    reader=readers.index((at.pp_rank, at.tp_rank)),
                    readers=len(readers),
                )
            )
    return plans


def _reads(layers: int, pp: int, stage: int, theirs: range) -> bool:
    mine = Stage.of(layers, stage, pp).layers
    return max(mine.start, theirs.start) < min(mine.stop, theirs.stop)


def place(dst: torch.Tensor, dst_ids: torch.Tensor, packed: torch.Tensor, plan: ShardPlan) -> None:
    """Writes packed[src_layers, ..., src_heads, :] of a shard into dst's blocks dst_ids at
    dst_layers and dst_heads."""
    part = packed[plan.src_layers][:, :, :, :, plan.src_heads]
    dst[plan.dst_layers][:, :, dst_ids, :, plan.dst_heads] = part.to(device=dst.device)
