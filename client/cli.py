"""`python -m client generate "prompt" [--stream] [--url HOST:PORT] [--protocol grpc|http] ...`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from client import DEFAULT_MODEL, ClientError, SamplingParams, make_client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt")
    gen.add_argument("prompt", help="prompt text")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--url", default=None, help="HOST:PORT (default 127.0.0.1:8001 grpc, :8000 http)")
    gen.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="orchestrator (default) or colocated")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None, help="absent: greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop word (repeatable)")
    gen.add_argument("--timeout", type=float, default=None, help="seconds for the whole request")
    gen.add_argument("--timings", action="store_true", help="print TTFT, TPOT and latency to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        with make_client(args.url, args.protocol) as client:
            start = time.perf_counter()
            if args.stream:
                arrivals = []
                reason = ""
                for piece in client.stream(args.prompt, params, model=args.model, timeout_s=args.timeout):
                    print(piece.text, end="", flush=True)
                    arrivals.append(piece.arrival)
                    reason = piece.finish_reason or reason
                print()
                if args.timings and arrivals:
                    tpot = (arrivals[-1] - arrivals[0]) / max(len(arrivals) - 1, 1)
                    print(
                        f"finish={reason} pieces={len(arrivals)} ttft={arrivals[0] - start:.4f}s "
                        f"tpot={tpot:.4f}s latency={arrivals[-1] - start:.4f}s",
                        file=sys.stderr,
                    )
            else:
                result = client.generate(args.prompt, params, model=args.model, timeout_s=args.timeout)
                print(result.text)
                if args.timings:
                    print(
                        f"finish={result.finish_reason} tokens={len(result.token_ids)} "
                        f"latency={result.latency_s:.4f}s",
                        file=sys.stderr,
                    )
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
