"""`make demo`: a real instruct model served disaggregated and colocated on a real tritonserver.

    python -m client.demo --model-repository DIR --model-dir MODEL [--http-port 8000 --grpc-port 8001
        --metrics-port 8002] [--max-tokens 64]

Chat questions (rendered with the model's chat template) stream concurrently through the
orchestrator (prefill -> KV transfer -> decode), then through the colocated model; each answer is
shown with its TTFT, TPOT and token count, and the two paths must give the same tokens. Last, one
chat completion goes through the OpenAI-compatible frontend with the official `openai` package.
Exits 1 if the two paths disagree.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from backends.launcher import TritonServer, TritonServerConfig
from client.aio import AsyncGrpcClient
from client.api import SamplingParams
from client.openai_server import FrontendConfig, FrontendThread

QUESTIONS = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write a haiku about the sea.",
)
OPENAI_QUESTION = "What is the chemical symbol for gold?"


class Answer(NamedTuple):
    question: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    ttft_ms: float
    tpot_ms: float  # mean time between tokens after the first


async def _ask(
    client: AsyncGrpcClient, model: str, question: str, prompt: str, params: SamplingParams
) -> Answer:
    loop = asyncio.get_running_loop()
    start = loop.time()
    text: list[str] = []
    ids: list[int] = []
    reason = ""
    first_at = last_at = start
    async for piece in client.stream(prompt, params, model=model):
        now = loop.time()
        if not ids:
            first_at = now
        text.append(piece.text)
        ids.extend(piece.token_ids)
        reason = piece.finish_reason or reason
        last_at = now
    # A response may carry several tokens (sends that fell behind are merged): TPOT is the time
    # after the first token over the tokens that came after it, counted from output_ids.
    tpot = (last_at - first_at) / (len(ids) - 1) if len(ids) > 1 else 0.0
    return Answer(question, "".join(text), tuple(ids), reason, (first_at - start) * 1e3, tpot * 1e3)


async def ask_all(url: str, model: str, prompts: Sequence[str], params: SamplingParams) -> list[Answer]:
    """Every question at once, one stream each; answers in question order."""
    client = AsyncGrpcClient(url)
    try:
        return list(
            await asyncio.gather(
                *(_ask(client, model, q, p, params) for q, p in zip(QUESTIONS, prompts, strict=True))
            )
        )
    finally:
        await client.close()


def show(label: str, answers: list[Answer]) -> None:
    print(f"== {label}: {len(answers)} chat questions on concurrent streams, greedy")
    for a in answers:
        print(f"  Q: {a.question}")
        print(f"  A: {a.text.strip()!r}")
        print(
            f"     {len(a.token_ids)} tokens ({a.finish_reason}), TTFT {a.ttft_ms:.1f} ms, TPOT {a.tpot_ms:.2f} ms"
        )
    print()


def openai_chat(frontend_url: str, model: str) -> tuple[str, Any]:
    """One streamed chat completion with the official package; returns the text and the usage."""
    import openai

    oai = openai.OpenAI(base_url=frontend_url + "/v1", api_key="unused", max_retries=0)
    stream = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": OPENAI_QUESTION}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, use = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        use = chunk.usage or use
    return "".join(text), use


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True, help="the served model (its tokenizer)")
    parser.add_argument("--http-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--grpc-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    prompts = [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
        )
        for q in QUESTIONS
    ]
    params = SamplingParams(max_tokens=args.max_tokens)
    config = TritonServerConfig(
        model_repository=args.model_repository,
        http_port=args.http_port or None,
        grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None,
    )
    print(f"starting tritonserver on {args.model_repository} ({args.model_dir.name}) ...", flush=True)
    with TritonServer(config) as server:
        print(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}\n")
        # One short request per path first: the figures below are then not first-call costs.
        for model in ("orchestrator", "colocated"):
            asyncio.run(ask_all(server.grpc_url, model, prompts, SamplingParams(max_tokens=2)))
        disagg = asyncio.run(ask_all(server.grpc_url, "orchestrator", prompts, params))
        show("disaggregated (orchestrator -> prefill -> KV transfer -> decode)", disagg)
        coloc = asyncio.run(ask_all(server.grpc_url, "colocated", prompts, params))
        show("colocated (one engine, both phases)", coloc)
        same = [a.token_ids == b.token_ids for a, b in zip(disagg, coloc, strict=True)]
        if all(same):
            print(f"disaggregated == colocated: the same tokens for all {len(same)} questions\n")
        else:
            print(
                f"MISMATCH: disaggregated and colocated differ on questions {[i for i, s in enumerate(same) if not s]}"
            )
        frontend_config = FrontendConfig(
            triton_url=server.grpc_url, port=0, tokenizer_dir=str(args.model_dir)
        )
        with FrontendThread(frontend_config) as frontend:
            print(
                f"== OpenAI-compatible frontend on {frontend.url}: openai.OpenAI().chat.completions.create(stream=True)"
            )
            text, use = openai_chat(frontend.url, "orchestrator")
            print(f"  Q: {OPENAI_QUESTION}")
            print(f"  A: {text.strip()!r}")
            if use is not None:
                print(
                    f"     usage: {use.prompt_tokens} prompt tokens, {use.completion_tokens} completion tokens\n"
                )
    print("server stopped")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
