"""The trace analysis of `client.bench overhead --trace-dir`, on trace files written by hand in the
format backends/common/trace.py writes (the real server's are read in docs/overhead.md's runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.bench.token_path import REQUEST_FIRST, TOKEN, breakdown, load, load_tagged, request_breakdown


def write(path: Path, lines: list[tuple[str, float, str]]) -> None:
    path.write_text("".join(f"{e} {t:.7f} {r}\n" if r else f"{e} {t:.7f}\n" for e, t, r in lines))


def test_each_requests_first_token_hops_from_its_tagged_events(tmp_path: Path) -> None:
    names = [event for event, _ in REQUEST_FIRST]
    orch: list[tuple[str, float, str]] = []
    prefill: list[tuple[str, float, str]] = []
    for k, rid in enumerate(["a" * 32, "b" * 32, "c" * 32]):
        t = 100.0 + k * 0.0005  # interleaved requests: only the tags tell them apart
        for i, name in enumerate(names):
            t += (i + 1 + k) * 1e-3  # so the hop into event i of request k takes i + 1 + k ms
            (orch if name.startswith("o.") else prefill).append((name, t, rid))
    orch.append(("o.locked", 200.0, "a" * 32))  # a later call of the same request: not the first
    orch.append(("send", 100.01, ""))  # untagged events are not a request's
    write(tmp_path / "orchestrator.1.trace", orch)
    write(tmp_path / "prefill.2.trace", prefill)

    tagged = load_tagged(tmp_path, 99.0, 101.0)
    assert sorted(tagged) == ["a" * 32, "b" * 32, "c" * 32]
    hops = request_breakdown(tagged)
    assert [h[0] for h in hops] == [hop for _, hop in REQUEST_FIRST[:-1]]
    for i, (_, p50, p90) in enumerate(hops):
        # hop i ends at event i + 1: i + 2 + k ms; the median request is k = 1
        assert p50 == pytest.approx(i + 3, abs=1e-3)
        assert p90 == pytest.approx(float(np.percentile([i + 2, i + 3, i + 4], 90)), abs=1e-3)
    assert request_breakdown(load_tagged(tmp_path, 150.0, 250.0)) == []  # no request has every hop


def test_a_later_tokens_hops_walk_back_from_its_arrival(tmp_path: Path) -> None:
    chain = TOKEN["orchestrator"]
    lines: dict[str, list[tuple[str, float, str]]] = {"decode": [], "orchestrator": []}
    arrivals = []
    for k in range(4):  # one stream: each token's events come before the next token's
        t = 10.0 + k * 0.1
        for i, (proc, event, _) in enumerate(chain):
            t += (i + 1) * 1e-3
            lines[proc].append((event, t, ""))
        arrivals.append(t + 0.5e-3)
    write(tmp_path / "decode.1.trace", lines["decode"])
    write(tmp_path / "orchestrator.2.trace", lines["orchestrator"])
    hops = breakdown(load(tmp_path), arrivals, chain, since=0.0)
    assert [h[0] for h in hops] == [hop for _, _, hop in chain]
    assert [round(p50, 3) for _, p50, _ in hops] == [2.0, 3.0, 4.0, 5.0, 6.0, 0.5]
