"""KV handle: the small, versioned message that names a finished sequence's KV blocks.

Prefill returns ``handle.encode()`` (UTF-8 JSON, never pickle) to the orchestrator, which passes it to a
decode instance; ``KVHandle.decode`` validates every field (version, exact key set, types, sizes, ranges)
before anything else looks at it, and raises ``KVHandleError`` naming the offending field.

Wire format, version 2 (keys sorted, no whitespace)::

    {"version": 2, "transport": "shm", "num_tokens": 37, "num_blocks": 3,
     "layout": {"num_layers": 2, "num_kv_heads": 8, "head_dim": 64, "block_size": 16, "dtype": "bfloat16"},
     "tp_size": 2, "pp_size": 1,
     "shards": [{"tp_rank": 0, "pp_rank": 0, "address": "127.0.0.1:41234", "lease": "<32 hex>",
                 "instance": "<16 hex>", "block_runs": [[4, 2], [9, 1]], "pool_blocks": 64,
                 "segment": "kvp_1a2b", "checksum": "<16 hex>"},
                {"tp_rank": 1, "pp_rank": 0, ...}]}

``layout`` is the model's: all its layers and KV heads. The prefill shard of pipeline stage p and
tensor-parallel rank r holds the layers of stage p (engine.sharding.Stage) and heads
``[r*H/tp, (r+1)*H/tp)``. ``block_runs`` lists ``[first_block, count]`` runs in sequence order (the
k-th block of the sequence is the k-th id the runs expand to). A handle from one prefill rank holds
one shard; ``KVHandle.merge`` joins the ranks' handles into a complete one (one shard per stage and
tensor-parallel rank, sorted by stage, then rank).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from engine.kv_cache import DTYPES, KVLayout
from engine.sharding import Stage
from engine.shm_pool import SEGMENT_RE
from kv_transfer.errors import KVHandleError

HANDLE_VERSION = 2
TRANSPORTS = ("shm", "tcp", "cuda_ipc", "nccl")
MAX_HANDLE_BYTES = 1 << 20
MAX_BLOCKS = 1 << 22
_HEX = re.compile(r"[0-9a-f]+")
_HOST_RE = re.compile(r"[A-Za-z0-9_.:-]{1,253}")


@dataclass(frozen=True)
class ShardRef:
    """Where one prefill rank's part of the KV lives, and the lease guarding it."""

    tp_rank: int
    pp_rank: int
    address: str  # "host:port" of that rank's control server
    lease: str  # 32 lowercase hex
    instance: str  # 16 lowercase hex, a random id of the sender (new after every restart)
    block_runs: tuple[tuple[int, int], ...]
    pool_blocks: int  # blocks in that rank's pool (every block id is below it)
    segment: str | None  # shared-memory segment name (shm transport only)
    checksum: str | None  # 16 lowercase hex: the packed-bytes checksum (see blockcopy), or None

    @property
    def block_ids(self) -> list[int]:
        return [b for start, count in self.block_runs for b in range(start, start + count)]

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp_rank": self.tp_rank,
            "pp_rank": self.pp_rank,
            "address": self.address,
            "lease": self.lease,
            "instance": self.instance,
            "block_runs": [list(run) for run in self.block_runs],
            "pool_blocks": self.pool_blocks,
            "segment": self.segment,
            "checksum": self.checksum,
        }


def runs_of(block_ids: list[int]) -> tuple[tuple[int, int], ...]:
    """Compresses block ids (in sequence order) into [start, count] runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return tuple(runs)


@dataclass(frozen=True)
class KVHandle:
    """A validated KV handle. Construct through the sender (register) or ``KVHandle.decode``."""

    transport: str
    num_tokens: int
    num_blocks: int
    layout: KVLayout  # the model's: all layers, all KV heads
    tp_size: int
    shards: tuple[ShardRef, ...]
    pp_size: int = 1
    version: int = HANDLE_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    def stage_layers(self, pp_rank: int) -> range:
        """The layers prefill stage `pp_rank` holds."""
        return Stage.of(self.layout.num_layers, pp_rank, self.pp_size).layers

    def layout_of(self, shard: ShardRef) -> KVLayout:
        """The layout of a shard's pool: its stage's layers, its rank's KV heads."""
        layers = len(self.stage_layers(shard.pp_rank))
        return dataclasses.replace(self.layout.tp_shard(self.tp_size), num_layers=layers)

    def shard(self, pp_rank: int, tp_rank: int) -> ShardRef:
        """The shard of stage `pp_rank`, tensor-parallel rank `tp_rank` (the handle is complete)."""
        return self.shards[pp_rank * self.tp_size + tp_rank]

    @property
    def complete(self) -> bool:
        """True when the handle has one shard per prefill stage and rank (a pull needs that)."""
        return len(self.shards) == self.tp_size * self.pp_size

    def encode(self) -> bytes:
        doc = {
            "version": self.version,
            "transport": self.transport,
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "layout": self.layout.to_dict(),
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "shards": [s.to_dict() for s in self.shards],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview | str) -> KVHandle:
        """Parses and validates handle bytes; raises KVHandleError naming the problem."""
        if isinstance(data, str):
            data = data.encode()
        raw = bytes(data)
        if len(raw) > MAX_HANDLE_BYTES:
            raise KVHandleError(f"KV handle of {len(raw)} bytes exceeds the {MAX_HANDLE_BYTES}-byte limit")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KVHandleError(f"KV handle is not valid UTF-8 JSON: {exc}") from None
        if isinstance(doc, dict) and "version" in doc and doc["version"] != HANDLE_VERSION:
            version = _int(doc["version"], "version")
            raise KVHandleError(f"KV handle version {version} is not supported (expected {HANDLE_VERSION})")
        keys = {"version", "transport", "num_tokens", "num_blocks", "layout", "tp_size", "pp_size", "shards"}
        doc = _obj(doc, "handle", keys)
        version = _int(doc["version"], "version")
        lay = _obj(doc["layout"], "layout", {"num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"})
        dtype = lay["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise KVHandleError(f"layout.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        layout = KVLayout(
            num_layers=_int(lay["num_layers"], "layout.num_layers", 1, 4096),
            num_kv_heads=_int(lay["num_kv_heads"], "layout.num_kv_heads", 1, 4096),
            head_dim=_int(lay["head_dim"], "layout.head_dim", 1, 65536),
            block_size=_int(lay["block_size"], "layout.block_size", 1, 65536),
            dtype=dtype,
        )
        shards_doc = doc["shards"]
        if not isinstance(shards_doc, list):
            raise KVHandleError("shards must be a list")
        shards = tuple(_shard(s, i) for i, s in enumerate(shards_doc))
        transport = doc["transport"]
        if not isinstance(transport, str):
            raise KVHandleError("transport must be a string")
        return cls(
            transport=transport,
            num_tokens=_int(doc["num_tokens"], "num_tokens", 1, MAX_BLOCKS * 65536),
            num_blocks=_int(doc["num_blocks"], "num_blocks", 1, MAX_BLOCKS),
            layout=layout,
            tp_size=_int(doc["tp_size"], "tp_size", 1, 1024),
            shards=shards,
            pp_size=_int(doc["pp_size"], "pp_size", 1, 1024),
            version=version,
        )

    @classmethod
    def merge(cls, parts: list[KVHandle]) -> KVHandle:
        """Joins the handles of every prefill rank into one complete handle."""
        if not parts:
            raise KVHandleError("merge needs at least one handle")
        first = parts[0]

        def key(h: KVHandle) -> tuple[Any, ...]:
            return (h.transport, h.num_tokens, h.num_blocks, h.layout, h.tp_size, h.pp_size)

        if any(key(p) != key(first) for p in parts):
            raise KVHandleError("cannot merge handles of different sequences, layouts or transports")
        shards = sorted((s for p in parts for s in p.shards), key=lambda s: (s.pp_rank, s.tp_rank))
        return cls(
            first.transport, first.num_tokens, first.num_blocks, first.layout, first.tp_size, tuple(shards),
            first.pp_size,
        )  # fmt: skip


def _validate(h: KVHandle) -> None:
    if h.version != HANDLE_VERSION:
        raise KVHandleError(f"KV handle version {h.version} is not supported (expected {HANDLE_VERSION})")
    if h.transport not in TRANSPORTS:
        raise KVHandleError(f"transport must be one of {TRANSPORTS}, got {h.transport!r}")
    bs = h.layout.block_size
    if not (h.num_blocks - 1) * bs < h.num_tokens <= h.num_blocks * bs:
        raise KVHandleError(
            f"num_tokens {h.num_tokens} does not fit num_blocks {h.num_blocks} of {bs} tokens"
        )
    if h.layout.num_kv_heads % h.tp_size:
        raise KVHandleError(f"num_kv_heads {h.layout.num_kv_heads} is not divisible by tp_size {h.tp_size}")
    if h.layout.num_layers < h.pp_size:
        raise KVHandleError(f"{h.layout.num_layers} layers cannot be split over pp_size {h.pp_size}")
    if not 1 <= len(h.shards) <= h.tp_size * h.pp_size:
        raise KVHandleError(f"a handle needs 1..{h.tp_size * h.pp_size} shards, got {len(h.shards)}")
    ranks = [(s.pp_rank, s.tp_rank) for s in h.shards]
    in_range = all(0 <= r < h.tp_size and 0 <= p < h.pp_size for p, r in ranks)
    if len(set(ranks)) != len(ranks) or ranks != sorted(ranks) or not in_range:
        raise KVHandleError(
            f"shard (pp_rank, tp_rank) pairs {ranks} must be distinct, sorted and below "
            f"pp_size {h.pp_size} and tp_size {h.tp_size}"
        )
    for s in h.shards:
        total = sum(count for _, count in s.block_runs)
        if total != h.num_blocks:
            raise KVHandleError(f"shard {s.tp_rank} names {total} blocks, expected num_blocks {h.num_blocks}")
        ids = s.block_ids
        if len(set(ids)) != len(ids):
            raise KVHandleError(f"shard {s.tp_rank} names a block twice")
        if max(ids) >= s.pool_blocks:
            raise KVHandleError(f"shard {s.tp_rank} block id {max(ids)} >= pool_blocks {s.pool_blocks}")
        if (h.transport == "shm") != (s.segment is not None):
            raise KVHandleError(f"shard {s.tp_rank}: a segment name is required for shm and only for shm")


def _obj(value: Any, name: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KVHandleError(f"{name} must be a JSON object")
    if set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise KVHandleError(f"{name} keys do not match: missing {missing}, unexpected {extra}")
    return value


def _int(value: Any, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    # bool is an int subclass in Python; a handle with "true" where a number belongs is malformed.
    if not isinstance(value, int) or isinstance(value, bool):
        raise KVHandleError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise KVHandleError(f"{name} = {value} is out of range [{lo}, {hi}]")
    return value


def _hex(value: Any, name: str, length: int) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX.fullmatch(value):
        raise KVHandleError(f"{name} must be {length} lowercase hex digits")
    return value


def _shard(value: Any, index: int) -> ShardRef:
    name = f"shards[{index}]"
    keys = {
        "tp_rank",
        "pp_rank",
        "address",
        "lease",
        "instance",
        "block_runs",
        "pool_blocks",
        "segment",
        "checksum",
    }
    doc = _obj(value, name, keys)
    address = doc["address"]
    if not isinstance(address, str) or ":" not in address:
        raise KVHandleError(f"{name}.address must be 'host:port'")
    host, _, port = address.rpartition(":")
    if not _HOST_RE.fullmatch(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise KVHandleError(f"{name}.address {address!r} must be 'host:port' with a port in 1..65535")
    runs_doc = doc["block_runs"]
    if not isinstance(runs_doc, list) or not runs_doc:
        raise KVHandleError(f"{name}.block_runs must be a non-empty list")
    runs = []
    for j, run in enumerate(runs_doc):
        if not isinstance(run, list) or len(run) != 2:
            raise KVHandleError(f"{name}.block_runs[{j}] must be [start, count]")
        runs.append(
            (
                _int(run[0], f"{name}.block_runs[{j}].start", 0, MAX_BLOCKS),
                _int(run[1], f"{name}.block_runs[{j}].count", 1, MAX_BLOCKS),
            )
        )
    segment = doc["segment"]
    if segment is not None and (not isinstance(segment, str) or not SEGMENT_RE.fullmatch(segment)):
        raise KVHandleError(f"{name}.segment must be null or 1-64 characters of [A-Za-z0-9_.-]")
    checksum = doc["checksum"]
    return ShardRef(
        tp_rank=_int(doc["tp_rank"], f"{name}.tp_rank", 0, 1023),
        pp_rank=_int(doc["pp_rank"], f"{name}.pp_rank", 0, 1023),
        address=address,
        lease=_hex(doc["lease"], f"{name}.lease", 32),
        instance=_hex(doc["instance"], f"{name}.instance", 16),
        block_runs=tuple(runs),
        pool_blocks=_int(doc["pool_blocks"], f"{name}.pool_blocks", 1, MAX_BLOCKS),
        segment=segment,
        checksum=None if checksum is None else _hex(checksum, f"{name}.checksum", 16),
    )
