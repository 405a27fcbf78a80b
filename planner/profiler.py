"""Profiler: time our engine over a grid of batch shapes and fit the profile coefficients.

    python -m planner profile --model DIR --device cpu|cuda --out profile.json

The output has the format of the published profiles (planner.profile), under the model's name and
the tensor-parallel degree measured (`--tp N`: the engine's TP=N instance, one process per rank).
With `--pp N` the engine runs N pipeline stages and each timed step goes through all of them (the
whole-pipeline latency of one batch, hops included); the format has no pipeline key, so such a
profile is written under the model name with "@ppN" appended: it is there to check the planner's
pipeline model (a stage takes 1/pp of the whole-model time plus a hop), not to plan from.

The per-iteration serving overhead ("serving_overhead_ms") is what the engine's step loop
(schedule -> run -> postprocess: admission, freeing, retiring finished sequences) adds to a bare
decode step of the same batch, timed alternately on the same sequences."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from planner import PlannerError
from planner.fit import DecodeSample, FitError, PrefillSample, fit_decode, fit_prefill
from planner.model_spec import from_hf_config
from planner.profile import Profile, TpProfile, save_profile


@dataclass(frozen=True)
class ProfileGrid:
    """Batch shapes to time. Prefill: every (batch size, prompt length) whose tokens fit the budget.
    Decode: every (batch size, context length); `decode_steps` consecutive steps are timed each."""

    prefill_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    prefill_lens: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_ctx_lens: tuple[int, ...] = (32, 128, 512)
    decode_steps: int = 4
    repeats: int = 3
    max_batch_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prefill_batch_sizes or not self.prefill_lens or not self.decode_batch_sizes:
            raise PlannerError("the profile grid needs prefill and decode shapes")
        if (
            min(
                *self.prefill_batch_sizes, *self.prefill_lens, *self.decode_batch_sizes, *self.decode_ctx_lens
            )
            < 1
        ):
            raise PlannerError("grid sizes must be >= 1")
        if self.repeats < 1 or self.decode_steps < 1:
            raise PlannerError("repeats and decode_steps must be >= 1")

    @staticmethod
    def quick() -> ProfileGrid:
        return ProfileGrid((1, 2, 4), (16, 64, 128, 256), (1, 2, 4, 8, 16), (32, 128), 3, 2, 1024)


class Measurements(NamedTuple):
    """What the profiler timed: prefill and decode samples (ms) and the serving overhead per step."""

    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    overhead_ms: float


OVERHEAD_BATCHES = (1, 4, 16)
OVERHEAD_STEPS = 8


def _timer(device: str) -> Callable[[], float]:
    if device.startswith("cuda"):
        import torch

        def sync_clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return sync_clock
    return time.perf_counter


def measure(
    model_dir: str, device: str, grid: ProfileGrid, num_threads: int | None = None, tp: int = 1, pp: int = 1
) -> Measurements:
    """Run the engine over the grid; times in milliseconds, the minimum of `repeats` runs (other load on
    the machine only ever adds time, so the minimum is the engine's own cost)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    spec = from_hf_config(model_dir)
    max_len = spec.max_position_embeddings
    bs = 16
    need = max(
        max(grid.prefill_batch_sizes) * (max(grid.prefill_lens) // bs + 2),
        max(grid.decode_batch_sizes) * ((max(grid.decode_ctx_lens) + grid.decode_steps + 1) // bs + 2),
    )
    eng = LLMEngine(
        EngineConfig(
            model_dir=model_dir, device=device, block_size=bs, num_blocks=need + 8,
            max_num_batched_tokens=grid.max_batch_tokens, max_num_seqs=max(grid.decode_batch_sizes),
            num_threads=num_threads, tp_size=tp, pp_size=pp,
            device_ids=tuple(range(tp * pp)) if device == "cuda" and tp * pp > 1 else (),
        )
    )  # fmt: skip
    try:
        return _measure(eng, spec.vocab_size, max_len, grid, _timer(device))
    finally:
        eng.close()


def _measure(
    eng: Any, vocab: int, max_len: int, grid: ProfileGrid, clock: Callable[[], float]
) -> Measurements:
    from engine.sampling import SamplingParams
    from engine.sequence import Sequence

    rng = np.random.default_rng(grid.seed)

    def seqs(batch: int, length: int, steps: int) -> list[Any]:
        return [
            Sequence(prompt_ids=rng.integers(0, vocab, size=length).tolist(),
                     params=SamplingParams(max_tokens=steps + 1, ignore_eos=True))
            for _ in range(batch)
        ]  # fmt: skip

    # Warm up kernels, the allocator and torch's thread pool before anything is timed.
    for _ in range(3):
        batch = seqs(min(grid.prefill_batch_sizes), max(grid.prefill_lens), 2)
        eng.prefill(batch)
        eng.decode_step(batch)
        for s in batch:
            eng.free(s)
    pre: list[PrefillSample] = []
    for b in grid.prefill_batch_sizes:
        for n in grid.prefill_lens:
            if b * n > grid.max_batch_tokens or n >= max_len:
                continue
            times = []
            for r in range(grid.repeats + 1):  # the first run warms up kernels and allocator
                batch = seqs(b, n, 1)
                t0 = clock()
                eng.prefill(batch)
                dt = clock() - t0
                for s in batch:
                    eng.free(s)
                if r:
                    times.append(dt * 1000.0)
            pre.append(PrefillSample(b * n, b * n * n, min(times)))
    dec: list[DecodeSample] = []
    for b in grid.decode_batch_sizes:
        for n in grid.decode_ctx_lens:
            if n + grid.decode_steps + 1 >= max_len:
                continue
            per_step: dict[int, list[float]] = {}
            for r in range(grid.repeats + 1):
                batch = seqs(b, n, grid.decode_steps)
                for k in range(0, b, max(1, grid.max_batch_tokens // n)):
                    eng.prefill(batch[k : k + max(1, grid.max_batch_tokens // n)])
                for step in range(grid.decode_steps):
                    t0 = clock()
                    eng.decode_step(batch)
                    if r:
                        per_step.setdefault(step, []).append((clock() - t0) * 1000.0)
                for s in batch:
                    eng.free(s)
            for step, times in per_step.items():
                # Before step k each sequence holds n + k tokens of KV and adds one: T = b*(n+k+1).
                dec.append(DecodeSample(b * (n + step + 1), b, min(times)))
    return Measurements(pre, dec, _overhead_ms(eng, seqs, clock))


def _overhead_ms(eng: Any, seqs: Callable[[int, int, int], list[Any]], clock: Callable[[], float]) -> float:
    """Median over steps of (engine.step() - engine.decode_step()) on the same running batch, the
    two timed alternately so that drift in machine load cancels; clamped at 0."""
    diffs: list[float] = []
    for b in OVERHEAD_BATCHES:
        batch = seqs(b, 64, 2 * OVERHEAD_STEPS + 2)
        for s in batch:
            eng.add(s)
        while any(not s.output_ids for s in batch):
            eng.step()  # prefill through the loop: the sequences are now the scheduler's running batch
        for _ in range(OVERHEAD_STEPS):
            t0 = clock()
            eng.step()
            t1 = clock()
            eng.decode_step(batch)
            diffs.append((t1 - t0) - (clock() - t1))
        for s in batch:
            eng.abort(s)
    return max(0.0, statistics.median(diffs) * 1000.0)


def build_profile(name: str, m: Measurements, tp: int = 1) -> tuple[Profile, FitError, FitError]:
    prefill, e_p = fit_prefill(m.prefill)
    d, e_d = fit_decode(m.decode)
    coefficients = TpProfile(prefill, d.decode_small, d.decode_large, d.threshold, m.overhead_ms)
    return Profile({name: {tp: coefficients}}, source="profiler"), e_p, e_d


def cmd_profile(a: argparse.Namespace) -> int:
    grid = ProfileGrid.quick() if a.quick else ProfileGrid(repeats=a.repeats)
    spec = from_hf_config(a.model)
    t0 = time.perf_counter()
    m = measure(a.model, a.device, grid, a.num_threads, a.tp, a.pp)
    name = a.name or spec.name
    prof, e_p, e_d = build_profile(name if a.pp == 1 else f"{name}@pp{a.pp}", m, a.tp)
    save_profile(prof, a.out)
    if a.samples:
        rows = [{"phase": "prefill", **s._asdict()} for s in m.prefill] + [
            {"phase": "decode", **s._asdict()} for s in m.decode
        ]
        Path(a.samples).write_text(json.dumps(rows, indent=1) + "\n")
    print(
        f"profiled {a.model} on {a.device} at TP={a.tp}, PP={a.pp} in {time.perf_counter() - t0:.1f}s -> {a.out}"
    )
    print(f"  prefill fit: {e_p.samples} shapes, relative error mean {e_p.mean:.1%}, max {e_p.max:.1%}")
    print(f"  decode fit:  {e_d.samples} shapes, relative error mean {e_d.mean:.1%}, max {e_d.max:.1%}")
    print(f"  serving overhead: {m.overhead_ms:.3f} ms per step")
    print(json.dumps(prof.to_json(), indent=2))
    return 0


def add_parser(sub: Any) -> None:
    ap = sub.add_parser("profile", help="time the engine over batch shapes and fit a latency profile")
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", required=True, help="profile JSON to write")
    ap.add_argument("--name", help="model name in the profile (default: from config.json or the folder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads on CPU (1 resists contention)")
    ap.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel degree (processes on CPU, GPUs on CUDA)"
    )
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (the profile's key gets '@ppN')")
    ap.add_argument("--quick", action="store_true", help="a small grid (tests, smoke runs)")
    ap.add_argument("--samples", help="also write the raw measurements here (JSON)")
    ap.set_defaults(func=cmd_profile)
