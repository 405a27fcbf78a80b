"""`make demo`: start tritonserver on the default repository, stream a few prompts through the
orchestrator (disaggregated) and the colocated model over gRPC, print the text with TTFT and TPOT.

    python -m backends.demo [--model-repository model_repository] [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
"""

from __future__ import annotations

import argparse
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from backends.launcher import TritonServer, TritonServerConfig

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a harbor town",
    "A language model reads a sequence of",
]


def _inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    arrays = {
        "text_input": np.array([prompt.encode()], dtype=object),
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "stream": np.array([True]),
    }
    out = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(
            name,
            list(arr.shape),
            "BYTES" if arr.dtype == object else grpcclient.np_to_triton_dtype(arr.dtype),
        )
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def stream_prompts(url: str, model: str, prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """Sends every prompt at once on one gRPC stream; returns text, TTFT and TPOT of each."""
    events: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(
        callback=lambda result=None, error=None: events.put((result, error, time.perf_counter()))
    )
    sent = {}
    stats: dict[str, dict[str, Any]] = {}
    for i, prompt in enumerate(prompts):
        sent[str(i)] = time.perf_counter()
        stats[str(i)] = {"prompt": prompt, "text": "", "times": [], "done": False, "error": None}
        client.async_stream_infer(
            model, _inputs(prompt, max_tokens), request_id=str(i), enable_empty_final_response=True
        )
    while not all(s["done"] for s in stats.values()):
        result, error, at = events.get(timeout=120)
        if error is not None:
            raise RuntimeError(f"{model}: {error}")
        s = stats[result.get_response().id]
        text = result.as_numpy("text_output")
        if text is not None:
            s["text"] += text[0].decode()
            s["times"].append(at)
        s["done"] = result.get_response().parameters["triton_final_response"].bool_param
    client.stop_stream()
    client.close()
    for rid, s in stats.items():
        times = s.pop("times")
        s["ttft_ms"] = (times[0] - sent[rid]) * 1e3
        s["tpot_ms"] = (times[-1] - times[0]) / max(1, len(times) - 1) * 1e3
        s["tokens"] = len(times)
    return list(stats.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    config = TritonServerConfig(
        model_repository=args.model_repository,
        http_port=args.http_port or None,
        grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None,
    )
    print(f"starting tritonserver on {args.model_repository} ...", flush=True)
    with TritonServer(config) as server:
        print(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}\n")
        for model in ("orchestrator", "colocated"):
            label = (
                "disaggregated (orchestrator -> prefill -> KV transfer -> decode)"
                if model == "orchestrator"
                else "colocated"
            )
            print(f"== {label}: {len(PROMPTS)} concurrent streams, {args.max_tokens} tokens each")
            for s in stream_prompts(server.grpc_url, model, PROMPTS, args.max_tokens):
                print(f"  {s['prompt']!r} -> {s['text']!r}")
                print(f"     TTFT {s['ttft_ms']:.1f} ms, TPOT {s['tpot_ms']:.2f} ms, {s['tokens']} tokens")
            print()
    print("server stopped")


if __name__ == "__main__":
    main()
