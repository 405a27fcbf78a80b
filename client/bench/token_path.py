"""Where one token's time goes between the engine step that made it and the client, per hop.

Reads the server's trace files (backends/common/trace.py: a server started with DISAGG_TRACE_DIR)
and the client's arrival times of a one-stream run, and walks back from each arrival to the
latest event of each earlier hop: with one stream, a token's events are the latest ones before it.
The first token of each request (it comes from prefill) is left out.

The orchestrator's first-token path is also tagged with the request (trace.mark's `request`), so
it can be broken down per request at any number of streams (request_breakdown)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

Chain = list[tuple[str, str, str]]  # (process, event, what the hop from it to the next is)

# From the engine step that made a later token to the client, per path.
TOKEN: dict[str, Chain] = {
    "orchestrator": [
        ("decode", "step", "engine step -> decode writes the token"),
        ("decode", "send", "decode: write to the token channel"),
        ("decode", "sent", "token channel -> orchestrator has the frame"),
        ("orchestrator", "read", "orchestrator: hand-off, detokenize, build the response"),
        ("orchestrator", "send", "orchestrator: send (IPC to the server)"),
        ("orchestrator", "sent", "server -> gRPC -> client"),
    ],
    "colocated": [
        ("colocated", "step", "engine step -> its response's send starts"),
        ("colocated", "send", "colocated: send (IPC to the server)"),
        ("colocated", "sent", "server -> gRPC -> client"),
    ],
}
# From the client's send to the first token's arrival, per path.
FIRST: dict[str, Chain] = {
    "orchestrator": [
        ("client", "send", "client -> server -> orchestrator's execute"),
        ("orchestrator", "arrive", "orchestrator: tokenize, request channel -> prefill"),
        ("prefill", "arrive", "prefill: queue, batch, engine prefill"),
        ("prefill", "step", "prefill: lease the KV, build the result"),
        ("prefill", "send", "prefill writes the result -> orchestrator has the frame"),
        ("orchestrator", "read", "orchestrator: hand-off, detokenize, build the response"),
        ("orchestrator", "send", "orchestrator: send (IPC to the server)"),
        ("orchestrator", "sent", "server -> gRPC -> client"),
    ],
    "colocated": [
        ("client", "send", "client -> server -> colocated's execute"),
        ("colocated", "arrive", "colocated: tokenize, schedule, engine prefill"),
        ("colocated", "prefill", "engine prefill -> its response's send starts"),
        ("colocated", "send", "colocated: send (IPC to the server)"),
        ("colocated", "sent", "server -> gRPC -> client"),
    ],
}


# The orchestrator's first token, per request (tagged events; every hop in order).
REQUEST_FIRST: list[tuple[str, str]] = [
    ("o.start", "orchestrator -> prefill's request channel (or BLS call) -> admission"),
    ("p.arrive", "prefill: admit the request"),
    ("p.acked", "prefill: wake the engine loop, batch"),
    ("p.launch", "prefill: engine prefill"),
    ("p.step", "prefill: lease the KV"),
    ("p.leased", "prefill writes the result -> orchestrator has it (channel, hand-off)"),
    ("o.result", "orchestrator: detokenize, send the first token (IPC)"),
    ("o.pushed", ""),
]


def load_tagged(trace_dir: Path, since: float, until: float) -> dict[str, dict[str, float]]:
    """Each request's tagged events in [since, until]: the first time of each event name."""
    out: dict[str, dict[str, float]] = {}
    for f in trace_dir.glob("*.trace"):
        for line in f.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 3 and since <= float(parts[1]) <= until:
                out.setdefault(parts[2], {}).setdefault(parts[0], float(parts[1]))
    return out


def request_breakdown(tagged: dict[str, dict[str, float]]) -> list[tuple[str, float, float]]:
    """(hop, median ms, p90 ms) along REQUEST_FIRST over the requests that have every event."""
    names = [event for event, _ in REQUEST_FIRST]
    rows = [[ev[n] for n in names] for ev in tagged.values() if all(n in ev for n in names)]
    if not rows:
        return []
    d = np.diff(np.array(rows), axis=1) * 1e3
    return [
        (hop, float(np.median(d[:, i])), float(np.percentile(d[:, i], 90)))
        for i, (_, hop) in enumerate(REQUEST_FIRST[:-1])
    ]


def load(trace_dir: Path) -> dict[tuple[str, str], np.ndarray]:
    """Sorted event times per (model, event) over every trace file of the folder."""
    times: dict[tuple[str, str], list[float]] = {}
    for f in trace_dir.glob("*.trace"):
        model = f.name.split(".")[0]
        for line in f.read_text().splitlines():
            event, t, *_ = line.split(" ")
            times.setdefault((model, event), []).append(float(t))
    return {k: np.sort(np.array(v)) for k, v in times.items()}


def breakdown(
    events: dict[tuple[str, str], np.ndarray], arrivals: Sequence[float], chain: Chain, since: float
) -> list[tuple[str, float, float]]:
    """(hop, median ms, p90 ms) along `chain` for the responses that arrived at `arrivals`: from
    each arrival back to the latest event of each earlier hop (with one stream, that event is
    this response's). Events before `since` (another run) are ignored; chains over 1 s dropped."""
    since_events = {k: v[v >= since] for k, v in events.items()}
    rows: list[list[float]] = []
    for a in arrivals:
        t, ts = a, [a]
        for proc, event, _ in reversed(chain):
            ev = since_events.get((proc, event), np.empty(0))
            k = int(np.searchsorted(ev, t, side="right")) - 1
            if k < 0:
                break
            t = float(ev[k])
            ts.append(t)
        if len(ts) == len(chain) + 1 and a - t < 1.0:
            rows.append(np.diff(ts[::-1]).tolist())
    if not rows:
        return []
    d = np.array(rows) * 1e3
    return [
        (hop, float(np.median(d[:, i])), float(np.percentile(d[:, i], 90)))
        for i, (_, _, hop) in enumerate(chain)
    ]
