"""Frozen, validated configuration of KV senders (prefill side) and receivers (decode side)."""

from __future__ import annotations

from dataclasses import dataclass


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be in 0..65535 (0 = ephemeral), got {port}")


def _check_tp(tp_size: int, tp_rank: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need tp_size >= 1 and 0 <= tp_rank < tp_size, got {tp_size}, {tp_rank}")


def _check_pp(pp_size: int, pp_rank: int, model_layers: int | None) -> None:
    """model_layers: a sender's (None for a receiver, which reads the count from the handle)."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"need pp_size >= 1 and 0 <= pp_rank < pp_size, got {pp_size}, {pp_rank}")
    if model_layers is not None and (model_layers < 0 or (pp_size > 1 and model_layers == 0)):
        raise ValueError("a pipeline-parallel sender needs the model's layer count (model_layers)")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class SenderConfig:
    """Prefill side.

    host/port: where the control server listens (port 0 = ephemeral; the real port goes into handles).
    advertise_host: the host written into handles when host is a wildcard such as 0.0.0.0.
    checksum: None = on for CPU pools, off for CUDA pools (the hash runs on the host).
    tp_size/tp_rank, pp_size/pp_rank: this pool's place in the prefill instance (the pool holds
    its rank's KV heads of its stage's layers; handles carry the model's totals).
    model_layers: the model's layer count (0: the pool's, which is right when pp_size is 1).
    group_host/store_port: nccl transport only: the address of the TCPStore that pairwise process
    groups rendezvous on, and the interface gloo binds.
    """

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    lease_ttl_s: float = 30.0
    checksum: bool | None = None
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    model_layers: int = 0
    io_timeout_s: float = 30.0
    copy_workers: int = 2
    group_host: str = "127.0.0.1"
    store_port: int = 0
    group_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        _check_port("store_port", self.store_port)
        _check_tp(self.tp_size, self.tp_rank)
        _check_pp(self.pp_size, self.pp_rank, self.model_layers)
        _check_positive(
            lease_ttl_s=self.lease_ttl_s, io_timeout_s=self.io_timeout_s, group_timeout_s=self.group_timeout_s
        )
        if self.copy_workers < 1:
            raise ValueError(f"copy_workers must be >= 1, got {self.copy_workers}")
        if self.host in ("0.0.0.0", "::", "") and not self.advertise_host:
            raise ValueError("a wildcard host needs advertise_host (the address decode instances can reach)")


@dataclass(frozen=True)
class ReceiverConfig:
    """Decode side.

    tp_size/tp_rank, pp_size/pp_rank: this pool's place in the decode instance (its pool holds
    total_heads/tp_size heads of its stage's layers); pulls take this rank's heads and layers from
    the prefill shards that hold them.
    verify_checksum: check the handle's checksum against the bytes that arrived (CPU transports).
    group_host: nccl transport only: the interface gloo binds for pairwise groups.
    """

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    io_timeout_s: float = 30.0
    verify_checksum: bool = True
    copy_workers: int = 2
    group_host: str = "127.0.0.1"
    group_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_tp(self.tp_size, self.tp_rank)
        _check_pp(self.pp_size, self.pp_rank, None)
        _check_positive(io_timeout_s=self.io_timeout_s, group_timeout_s=self.group_timeout_s)
        if self.copy_workers < 1:
            raise ValueError(f"copy_workers must be >= 1, got {self.copy_workers}")
