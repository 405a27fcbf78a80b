"""Paged KV cache: one tensor holding fixed-size blocks for every layer.

Layout of the pool tensor: ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``.
A block id addresses the same slot in every layer, so a sequence's block table is shared by all
layers, and moving a sequence between engines means copying ``pool[:, :, block_ids]``. kv_transfer
relies on exactly this layout (``KVLayout`` travels in every KV handle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; expected one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class KVLayout:
    """Shape of one engine's KV pool (for one tensor-parallel rank)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # a key of DTYPES

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def block_numel(self) -> int:
        """Elements of one block in one layer for K or V."""
        return self.block_size * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block id across all layers, K and V."""
        return self.num_layers * 2 * self.block_numel * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def tp_shard(self, tp_size: int) -> KVLayout:
        """The layout each of `tp_size` tensor-parallel ranks holds (its share of the KV heads)."""
        if tp_size < 1 or self.num_kv_heads % tp_size:
            raise ValueError(f"{self.num_kv_heads} KV heads do not split over tp_size {tp_size}")
        heads = self.num_kv_heads // tp_size
        return KVLayout(self.num_layers, heads, self.head_dim, self.block_size, self.dtype)

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
            "dtype": self.dtype,
        }


class KVPool:
    """The block storage of one engine. Owns no allocation policy: see BlockManager."""

    def __init__(self, layout: KVLayout, tensor: torch.Tensor) -> None:
        if tensor.dim() != 6 or tuple(tensor.shape[:2]) != (layout.num_layers, 2):
            raise ValueError(f"pool tensor shape {tuple(tensor.shape)} does not match {layout}")
        if tuple(tensor.shape) != layout.pool_shape(tensor.shape[2]) or tensor.dtype != layout.torch_dtype:
            raise ValueError(f"pool tensor {tuple(tensor.shape)} {tensor.dtype} does not match {layout}")
        if not tensor.is_contiguous():
            raise ValueError("pool tensor must be contiguous")
        self.layout = layout
        self.tensor = tensor

    @classmethod
    def allocate(cls, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu") -> KVPool:
        tensor = torch.zeros(layout.pool_shape(num_blocks), dtype=layout.torch_dtype, device=device)
        return cls(layout, tensor)

    @property
    def num_blocks(self) -> int:
        return int(self.tensor.shape[2])

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def k(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, num_kv_heads, head_dim] view of layer's keys."""
        return self.tensor[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 1]

    def gather(self, block_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Packed copy of blocks: [num_layers, 2, len(block_ids), block_size, heads, head_dim]."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        return self.tensor.index_select(2, index)

    def scatter(self, block_ids: list[int] | torch.Tensor, packed: torch.Tensor) -> None:
        """Writes a packed tensor from gather() into the given blocks of this pool."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        expected = (*self.tensor.shape[:2], len(index), *self.tensor.shape[3:])
        if tuple(packed.shape) != expected:
            raise ValueError(f"packed KV shape {tuple(packed.shape)} != expected {expected}")
        self.tensor.index_copy_(2, index, packed.to(device=self.device, dtype=self.tensor.dtype))
