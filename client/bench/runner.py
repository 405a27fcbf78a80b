"""Open-loop load at one rate: each request is sent at its arrival time whatever the state of
earlier ones (a closed loop would slow down with the server and hide queueing), and streamed."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Sequence
from typing import NamedTuple

from tqdm import tqdm

from client import ClientError, SamplingParams, make_async_client
from client.bench.requests import NEVER_END_ID, BenchRequest
from client.bench.stats import RequestRecord, record


class RunResult(NamedTuple):
    records: list[RequestRecord]
    duration_s: float  # first send to last answer


async def _one(
    client: object, model: str, req: BenchRequest, at: float, t0: float, timeout_s: float
) -> RequestRecord:
    await asyncio.sleep(max(t0 + at - time.perf_counter(), 0.0))
    params = SamplingParams(max_tokens=req.output_len, end_id=NEVER_END_ID)
    send = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    try:
        async for piece in client.stream(req.prompt_ids, params, model=model, timeout_s=timeout_s):  # type: ignore[attr-defined]
            arrivals.append(piece.arrival)
            tokens += len(piece.token_ids)
    except ClientError as exc:
        return record(len(req.prompt_ids), send, arrivals, tokens, f"{type(exc).__name__}: {exc}")
    return record(len(req.prompt_ids), send, arrivals, tokens, None)


async def _run(
    url: str,
    protocol: str,
    model: str,
    reqs: Sequence[BenchRequest],
    times: Sequence[float],
    timeout_s: float,
    label: str,
) -> RunResult:
    client = make_async_client(url, protocol)
    try:
        t0 = time.perf_counter() + 0.05
        tasks = [
            asyncio.ensure_future(_one(client, model, r, float(a), t0, timeout_s))
            for r, a in zip(reqs, times, strict=True)
        ]
        with tqdm(total=len(tasks), desc=label, unit="req", leave=False) as bar:
            for fut in asyncio.as_completed(tasks):
                await fut
                bar.update(1)
        records = [t.result() for t in tasks]
        return RunResult(records, time.perf_counter() - t0)
    finally:
        await client.close()


def run_rate(
    url: str,
    protocol: str,
    model: str,
    reqs: Sequence[BenchRequest],
    times: Sequence[float],
    timeout_s: float = 300.0,
    label: str = "",
) -> RunResult:
    """Sends reqs at offsets `times` (seconds) and waits for all; errors are recorded, not raised."""
    return asyncio.run(_run(url, protocol, model, reqs, times, timeout_s, label or model))


def server_ttft(metrics_url: str, model: str) -> tuple[float, float]:
    """(sum, count) of the disagg_ttft_seconds histogram for `model` over all instances."""
    return server_histogram(metrics_url, "disagg_ttft_seconds", re.escape(model))


def server_histogram(metrics_url: str, family: str, models: str) -> tuple[float, float]:
    """(sum, count) of a histogram family over the models whose name matches the regular
    expression `models`, all instances."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    total = {"sum": 0.0, "count": 0.0}
    for kind in total:
        for m in re.finditer(rf"^{family}_{kind}\{{([^}}]*)\}} (\S+)$", text, re.M):
            label = re.search(r'model="([^"]*)"', m.group(1))
            if label and re.fullmatch(models, label.group(1)):
                total[kind] += float(m.group(2))
    return total["sum"], total["count"]
