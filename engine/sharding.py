"""Megatron-style tensor-parallel sharding of a Llama-family checkpoint.

Rank r of tp holds attention heads [r*H/tp, (r+1)*H/tp) and KV heads [r*KV/tp, (r+1)*KV/tp), so
each query head keeps the KV head it uses (GQA groups never straddle ranks), and the MLP's
intermediate columns [r*I/tp, (r+1)*I/tp). q/k/v and gate/up are column-parallel (their output
rows are sliced), o_proj and down_proj row-parallel (their input columns are sliced; the partial
outputs are summed over the ranks, and a bias is added once, after the sum). Embedding, norms
and the LM head are replicated; only rank 0 computes the LM head (it samples). Weights are sliced
at load time from the one checkpoint: no pre-sharded files.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig

# Checkpoint name suffix -> (dimension sliced, what it is sliced by).
_COLUMN_PARALLEL = {
    "self_attn.q_proj.weight": (0, "heads"),
    "self_attn.q_proj.bias": (0, "heads"),
    "self_attn.k_proj.weight": (0, "kv_heads"),
    "self_attn.k_proj.bias": (0, "kv_heads"),
    "self_attn.v_proj.weight": (0, "kv_heads"),
    "self_attn.v_proj.bias": (0, "kv_heads"),
    "mlp.gate_proj.weight": (0, "intermediate"),
    "mlp.gate_proj.bias": (0, "intermediate"),
    "mlp.up_proj.weight": (0, "intermediate"),
    "mlp.up_proj.bias": (0, "intermediate"),
}
_ROW_PARALLEL = {
    "self_attn.o_proj.weight": (1, "heads"),
    "mlp.down_proj.weight": (1, "intermediate"),
}


class ShardingError(ValueError):
    """The model does not split over the requested tensor-parallel degree."""


@dataclass(frozen=True)
class TPShard:
    """This process's place in a tensor-parallel group, and the sizes of its share of the model."""

    rank: int
    size: int
    num_heads: int  # local attention heads
    num_kv_heads: int  # local KV heads
    intermediate_size: int  # local MLP columns
    head_dim: int

    @classmethod
    def of(cls, config: ModelConfig, rank: int, size: int) -> TPShard:
        """Rank `rank` of `size`; ShardingError names what does not divide."""
        if size < 1 or not 0 <= rank < size:
            raise ShardingError(f"need 0 <= rank < tp_size, got rank {rank} of {size}")
        problems = [
            f"{what} {n} is not divisible by tp_size {size}"
            for what, n in (
                ("num_attention_heads", config.num_heads),
                ("num_key_value_heads", config.num_kv_heads),
                ("intermediate_size", config.intermediate_size),
            )
            if n % size
        ]
        if problems:
            # Replicating KV heads over ranks (TP > KV heads) is not supported: a rank's KV pool
            # holds a share of the heads, which is what KV transfer reshards between TP degrees.
            raise ShardingError(
                f"{config.model_type} model cannot run with tp_size {size}: " + "; ".join(problems)
            )
        return cls(
            rank,
            size,
            config.num_heads // size,
            config.num_kv_heads // size,
            config.intermediate_size // size,
            config.head_dim,
        )

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def slice_for(self, name: str) -> tuple[int, int, int] | None:
        """(dimension, start, stop) of this rank's part of checkpoint tensor `name`, or None when
        every rank holds all of it."""
        if self.size == 1:
            return None
        for table in (_COLUMN_PARALLEL, _ROW_PARALLEL):
            for suffix, (dim, unit) in table.items():
                if name.endswith(suffix):
                    width = {
                        "heads": self.num_heads * self.head_dim,
                        "kv_heads": self.num_kv_heads * self.head_dim,
                        "intermediate": self.intermediate_size,
                    }[unit]
                    return dim, self.rank * width, (self.rank + 1) * width
        return None


def single(config: ModelConfig) -> TPShard:
    """The whole model in one process."""
    return TPShard.of(config, 0, 1)


@dataclass(frozen=True)
class Stage:
    """This process's pipeline stage: the contiguous layers [first_layer, end_layer) it owns.

    Layers split as evenly as they go; when they do not divide, the first stages take one more
    (the last stage also runs the final norm and the LM head)."""

    index: int
    count: int
    first_layer: int
    end_layer: int

    @classmethod
    def of(cls, num_layers: int, index: int, count: int) -> Stage:
        if count < 1 or not 0 <= index < count:
            raise ShardingError(f"need 0 <= stage < pp_size, got stage {index} of {count}")
        if num_layers < count:
            raise ShardingError(f"a model of {num_layers} layers cannot run with pp_size {count}")
        base, extra = divmod(num_layers, count)
        first = index * base + min(index, extra)
        return cls(index, count, first, first + base + (1 if index < extra else 0))

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this stage (embedding: the first stage; final
        norm and LM head: the last; a decoder layer: the stage holding it)."""
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.layers
        if name.startswith("model.embed_tokens."):
            return self.is_first
        return self.is_last  # model.norm, lm_head


def whole_model(config: ModelConfig) -> Stage:
    """Every layer in one stage."""
    return Stage.of(config.num_layers, 0, 1)
