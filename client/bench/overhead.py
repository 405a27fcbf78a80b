"""`python -m client.bench overhead --url HOST:GRPC_PORT`: what a request pays at light load for
going through the orchestrator (prefill -> KV transfer -> decode) instead of the colocated model.

At 1, 2 and 4 concurrent streams (closed loop: each stream sends its next request when the last
one ends), the same requests go to `orchestrator` and to `colocated` in alternating rounds, so
both see the same machine state; TTFT and TPOT are measured at the client. It prints p50/p90 of
each, the ratios, the cores the hypervisor stole meanwhile, and a last line
`overhead: TPOT ratio X, TTFT +Y ms` (the worst p50 figures over the stream counts).

With `--trace-dir DIR`, for a server started with DISAGG_TRACE_DIR=DIR on this host, it also
prints where a token's time goes, hop by hop, on each path (client/bench/token_path.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client import SamplingParams, make_async_client
from client.bench.requests import FIRST_ORDINARY_ID, NEVER_END_ID
from client.bench.runner import server_histogram
from client.bench.stats import RequestRecord, record
from client.bench.token_path import FIRST, TOKEN, breakdown, load, load_tagged, request_breakdown
from measure.cpu_usage import snapshot, usage

MODELS = ("orchestrator", "colocated")


async def _stream(client: Any, model: str, prompts: list[list[int]], max_tokens: int) -> list[RequestRecord]:
    out = []
    for ids in prompts:
        params = SamplingParams(max_tokens=max_tokens, end_id=NEVER_END_ID)
        send = time.perf_counter()
        arrivals: list[float] = []
        tokens = 0
        async for piece in client.stream(ids, params, model=model, timeout_s=60.0):
            arrivals.append(piece.arrival)
            tokens += len(piece.token_ids)
        out.append(record(len(ids), send, arrivals, tokens, None))
    return out


async def _round(
    url: str, model: str, streams: int, prompts: list[list[int]], max_tokens: int
) -> list[RequestRecord]:
    """`streams` concurrent closed-loop streams, each sending its share of `prompts` in turn."""
    client = make_async_client(url, "grpc")
    try:
        shares = [prompts[k::streams] for k in range(streams)]
        done = await asyncio.gather(*(_stream(client, model, s, max_tokens) for s in shares))
        return [r for part in done for r in part]
    finally:
        await client.close()


async def _timings(
    url: str, model: str, prompts: list[list[int]], max_tokens: int
) -> tuple[list[float], list[float], list[float]]:
    """One stream: the send times, the first responses' and the later responses' arrival times."""
    client = make_async_client(url, "grpc")
    sends: list[float] = []
    firsts: list[float] = []
    laters: list[float] = []
    try:
        for ids in prompts:
            params = SamplingParams(max_tokens=max_tokens, end_id=NEVER_END_ID)
            sends.append(time.perf_counter())
            pieces = [p.arrival async for p in client.stream(ids, params, model=model, timeout_s=60.0)]
            firsts.append(pieces[0])
            laters += pieces[1:]
    finally:
        await client.close()
    return sends, firsts, laters


def trace_hops(url: str, trace_dir: Path, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Per-hop medians of the first and of the later tokens' paths on each model, from a
    one-stream run of `prompts` (the client's clock and the server's are the same host's)."""
    out: dict[str, Any] = {}
    for model in MODELS:
        since = time.perf_counter()
        sends, firsts, laters = asyncio.run(_timings(url, model, prompts, max_tokens))
        events = load(trace_dir)
        events[("client", "send")] = np.array(sends)
        out[model] = {
            "first": breakdown(events, firsts, FIRST[model], since),
            "later": breakdown(events, laters, TOKEN[model], since),
        }
    return out


def _stats(records: list[RequestRecord]) -> dict[str, float]:
    ttft = np.array([r.ttft for r in records]) * 1e3
    tpot = np.array([r.tpot for r in records]) * 1e3
    return {
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p90_ms": float(np.percentile(ttft, 90)),
        "tpot_p50_ms": float(np.percentile(tpot, 50)),
        "tpot_p90_ms": float(np.percentile(tpot, 90)),
    }


# The engines whose prefill time each path waits for (disagg_prefill_seconds, by model name).
PREFILL_MODELS = {"orchestrator": r"prefill(_\d+)?", "colocated": r"colocated"}


def measure(
    url: str,
    streams: Sequence[int],
    rounds: int,
    per_round: int,
    prompt_len: int,
    max_tokens: int,
    seed: int,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """Every stream count, `rounds` rounds of `per_round` requests per model, models alternating.
    With `metrics_url`, also the mean engine time of a prefill batch on each path."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(FIRST_ORDINARY_ID, 1000, size=prompt_len).tolist() for _ in range(per_round)]
    asyncio.run(_round(url, MODELS[0], 1, prompts[:2], max_tokens))  # warm both paths up
    asyncio.run(_round(url, MODELS[1], 1, prompts[:2], max_tokens))
    rows = []
    for n in streams:
        got: dict[str, list[RequestRecord]] = {m: [] for m in MODELS}
        prefill = {m: [0.0, 0.0] for m in MODELS}  # engine prefill seconds, batches
        before, started = snapshot(), time.perf_counter()
        for k in range(rounds):
            for model in MODELS if k % 2 == 0 else MODELS[::-1]:
                family, pattern = "disagg_prefill_seconds", PREFILL_MODELS[model]
                p0 = server_histogram(metrics_url, family, pattern) if metrics_url else (0.0, 0.0)
                got[model] += asyncio.run(_round(url, model, n, prompts, max_tokens))
                if metrics_url:
                    p1 = server_histogram(metrics_url, family, pattern)
                    prefill[model][0] += p1[0] - p0[0]
                    prefill[model][1] += p1[1] - p0[1]
        cpu = usage(before, snapshot())
        disagg, coloc = _stats(got["orchestrator"]), _stats(got["colocated"])
        for model, stats in (("orchestrator", disagg), ("colocated", coloc)):
            total, batches = prefill[model]
            stats["prefill_ms"] = 1e3 * total / batches if batches else float("nan")
        rows.append({
            "streams": n,
            "orchestrator": disagg,
            "colocated": coloc,
            "tpot_ratio": disagg["tpot_p50_ms"] / coloc["tpot_p50_ms"],
            "ttft_extra_ms": disagg["ttft_p50_ms"] - coloc["ttft_p50_ms"],
            "cores_stolen": cpu.cores_stolen,
            "cores_busy_others": cpu.cores_others,
            "window": (started, time.perf_counter()),
        })  # fmt: skip
    return {"prompt_len": prompt_len, "max_tokens": max_tokens, "rounds": rounds, "per_round": per_round,
            "rows": rows}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    has_prefill = not any(np.isnan(r["orchestrator"]["prefill_ms"]) for r in result["rows"])
    lines = [
        f"prompt {result['prompt_len']} tokens, {result['max_tokens']} new tokens, "
        f"{result['rounds']} rounds x {result['per_round']} requests per model and stream count",
        "streams  model         TTFT p50/p90 ms   TPOT p50/p90 ms   TPOT ratio  TTFT extra  stolen"
        + ("  prefill ms" if has_prefill else ""),
    ]
    for row in result["rows"]:
        for model in MODELS:
            s = row[model]
            tail = (
                f"   {row['tpot_ratio']:9.2f}  {row['ttft_extra_ms']:+8.1f} ms  {row['cores_stolen']:.2f}"
                if model == MODELS[0]
                else ""
            )
            pre = ""
            if has_prefill:
                pre = (
                    f"  {s['prefill_ms']:9.2f}"
                    if model == MODELS[0]
                    else " " * 36 + f"  {s['prefill_ms']:9.2f}"
                )
            lines.append(
                f"{row['streams']:7d}  {model:12s}  {s['ttft_p50_ms']:6.1f} / {s['ttft_p90_ms']:6.1f}   "
                f"{s['tpot_p50_ms']:6.2f} / {s['tpot_p90_ms']:6.2f}{tail}{pre}"
            )
    if has_prefill:
        beyond = max(
            r["ttft_extra_ms"] - (r["orchestrator"]["prefill_ms"] - r["colocated"]["prefill_ms"])
            for r in result["rows"]
        )
        lines.append(f"TTFT extra beyond the engines' prefill time difference: {beyond:+.1f} ms (worst)")
    worst_ratio = max(r["tpot_ratio"] for r in result["rows"])
    worst_extra = max(r["ttft_extra_ms"] for r in result["rows"])
    lines.append(f"overhead: TPOT ratio {worst_ratio:.2f}, TTFT {worst_extra:+.1f} ms")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m client.bench overhead", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton HOST:GRPC_PORT")
    p.add_argument("--streams", default="1,2,4", help="concurrent streams, comma-separated")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per model and stream count")
    p.add_argument("--requests", type=int, default=8, help="requests per round")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    p.add_argument("--metrics-url", help="Triton metrics (http://HOST:PORT/metrics): prefill engine times")
    p.add_argument(
        "--trace-dir", type=Path, help="the server's DISAGG_TRACE_DIR: also break a token's time down"
    )
    a = p.parse_args(argv)
    streams = [int(s) for s in a.streams.split(",") if s.strip()]
    if not streams or min(streams) < 1 or a.rounds < 1 or a.requests < 1 or a.max_tokens < 2:
        p.error("--streams, --rounds and --requests must be >= 1 and --max-tokens >= 2")
    result = measure(a.url, streams, a.rounds, a.requests, a.prompt_len, a.max_tokens, a.seed, a.metrics_url)
    print(report(result))
    if a.trace_dir is not None:
        rng = np.random.default_rng(a.seed)
        prompts = [
            rng.integers(FIRST_ORDINARY_ID, 1000, size=a.prompt_len).tolist() for _ in range(a.requests)
        ]
        for row in result["rows"]:
            hops = request_breakdown(load_tagged(a.trace_dir, *row["window"]))
            row["orchestrator_first_token_hops"] = hops
            print(f"orchestrator at {row['streams']} streams: server -> first token sent, per request")
            for name, p50, p90 in hops:
                print(f"  {name:58s} p50 {p50:6.3f} ms  p90 {p90:6.3f} ms")
        result["token_path"] = trace_hops(a.url, a.trace_dir, prompts, a.max_tokens)
        for model, paths in result["token_path"].items():
            for which, hops in paths.items():
                what = "client send -> first token" if which == "first" else "engine step -> later token"
                print(f"{model}: {what}, sum of medians {sum(h[1] for h in hops):.2f} ms")
                for name, p50, p90 in hops:
                    print(f"  {name:58s} p50 {p50:6.3f} ms  p90 {p90:6.3f} ms")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 0
