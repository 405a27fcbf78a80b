"""`python -m client.bench --url HOST:PORT --model orchestrator|colocated --workload W --rate R[,R2]
--num-requests N --ttft S --tpot S`, `python -m client.bench compare ...` (both models) and
`python -m client.bench overhead --url HOST:PORT` (the orchestrator path's cost at light load)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.bench.plots import plot
from client.bench.requests import arrival_times, make_requests
from client.bench.runner import run_rate, server_ttft
from client.bench.stats import RequestRecord, goodput, summarize


def _rates(text: str) -> list[float]:
    try:
        rates = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers separated by commas, got {text!r}") from None
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser(compare: bool) -> argparse.ArgumentParser:
    prog = "python -m client.bench" + (" compare" if compare else "")
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument(
        "--url", default="127.0.0.1:8001", help="Triton HOST:PORT (gRPC; HTTP with --protocol http)"
    )
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    if not compare:
        p.add_argument("--model", choices=("orchestrator", "colocated"), default="orchestrator")
    p.add_argument(
        "--metrics-url",
        default=None,
        help="Triton metrics, e.g. http://127.0.0.1:8002/metrics: "
        "compares the client's TTFT with the server's disagg_ttft_seconds",
    )
    p.add_argument("--workload", default="sharegpt", help="sharegpt | synthetic:SPEC | a file of lengths")
    p.add_argument("--rate", type=_rates, required=True, help="req/s, comma-separated for several runs")
    p.add_argument("--num-requests", type=int, default=100, help="per rate")
    p.add_argument("--ttft", type=_positive, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=_positive, required=True, help="TPOT SLO, seconds")
    p.add_argument("--target", type=float, default=0.9, help="attainment target for goodput")
    p.add_argument("--cv", type=_positive, default=1.0, help="arrival burstiness (gamma CV; 1 = Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-dir", default="models/tiny-llama", help="for the vocabulary, context and tokenizer"
    )
    p.add_argument("--timeout", type=_positive, default=300.0, help="per request, seconds")
    p.add_argument(
        "--scale-rate", type=float, default=None, help="rate of the SLO-scale plot (default: middle)"
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json and the PNG")
    return p


def _measure(
    args: argparse.Namespace, model: str, reqs: Any
) -> dict[float, tuple[list[RequestRecord], dict[str, Any]]]:
    runs: dict[float, tuple[list[RequestRecord], dict[str, Any]]] = {}
    for rate in args.rate:
        times = arrival_times(len(reqs), rate, args.cv, args.seed).tolist()
        before = server_ttft(args.metrics_url, model) if args.metrics_url else None
        res = run_rate(args.url, args.protocol, model, reqs, times, args.timeout, f"{model} @ {rate:g} req/s")
        summary = summarize(res.records, rate, res.duration_s, args.ttft, args.tpot)
        if before is not None:
            after = server_ttft(args.metrics_url, model)
            n = after[1] - before[1]
            summary["server_ttft_mean"] = (after[0] - before[0]) / n if n else float("nan")
            summary["server_ttft_count"] = n
        runs[rate] = (res.records, summary)
        _print_row(model, summary)
    return runs


def _print_row(model: str, s: dict[str, Any]) -> None:
    t, o, e = s["ttft"], s["tpot"], s["latency"]
    server = f" server_ttft_mean={s['server_ttft_mean']:.3f}" if "server_ttft_mean" in s else ""
    print(
        f"{model:12s} rate={s['rate']:<5g} attain={s['attainment']:.3f} (ttft {s['ttft_attainment']:.2f}, "
        f"tpot {s['tpot_attainment']:.2f}) errors={s['errors']} thr={s['throughput_rps']:.2f} req/s\n"
        f"{'':12s} TTFT p50/p90/p99={t['p50']:.3f}/{t['p90']:.3f}/{t['p99']:.3f} mean={t['mean']:.3f}{server}  "
        f"TPOT p50/p90/p99={o['p50'] * 1e3:.1f}/{o['p90'] * 1e3:.1f}/{o['p99'] * 1e3:.1f} ms  "
        f"latency p50/p90/p99={e['p50']:.2f}/{e['p90']:.2f}/{e['p99']:.2f} s",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "overhead":
        from client.bench.overhead import main as overhead

        return overhead(argv[1:])
    compare = bool(argv) and argv[0] == "compare"
    args = build_parser(compare).parse_args(argv[1:] if compare else argv)
    if args.num_requests < 1:
        raise SystemExit("--num-requests must be >= 1")
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    reqs = make_requests(
        args.workload,
        args.num_requests,
        args.seed,
        int(cfg["vocab_size"]),
        int(cfg["max_position_embeddings"]),
        args.model_dir,
    )
    models = ["orchestrator", "colocated"] if compare else [args.model]
    started = time.time()
    results = {m: _measure(args, m, reqs) for m in models}
    target = args.target
    report: dict[str, Any] = {
        "command": "python -m client.bench " + " ".join(argv),
        "workload": args.workload,
        "num_requests": args.num_requests,
        "ttft_slo": args.ttft,
        "tpot_slo": args.tpot,
        "target": target,
        "cv": args.cv,
        "started": started,
        "models": {},
    }
    for m, runs in results.items():
        rates = sorted(runs)
        g = goodput(rates, [runs[r][1]["attainment"] for r in rates], target)
        report["models"][m] = {
            "goodput_rps": g.tested,
            "goodput_interpolated_rps": g.interpolated,
            "runs": [runs[r][1] for r in rates],
            "records": {str(r): [rec._asdict() for rec in runs[r][0]] for r in rates},
        }
        print(
            f"{m}: goodput {g.tested:g} req/s (largest tested rate with attainment >= {target:g}; "
            f"interpolated {g.interpolated:.2f})"
        )
    if compare:
        d = report["models"]["orchestrator"]["goodput_interpolated_rps"]
        c = report["models"]["colocated"]["goodput_interpolated_rps"]
        # No ratio when colocated met the target at no tested rate (JSON null; nan would not parse).
        report["goodput_ratio"] = d / c if c > 0 else None
        ratio = f"{d / c:.2f}" if c > 0 else "undefined"
        print(f"goodput ratio disaggregated/colocated: {ratio} ({d:.2f} / {c:.2f} req/s, interpolated)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    scale_rate = args.scale_rate if args.scale_rate in args.rate else args.rate[len(args.rate) // 2]
    png = plot(
        args.out / "attainment.png",
        {m: {r: runs[r][0] for r in runs} for m, runs in results.items()},
        args.ttft,
        args.tpot,
        target,
        scale_rate,
        f"{args.workload}, {args.num_requests} req/rate, cv={args.cv:g}",
    )
    print(f"wrote {args.out / 'results.json'} and {png}")
    return 0
