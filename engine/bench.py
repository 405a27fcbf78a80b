"""Prefill and decode throughput of the engine vs transformers (or vs itself at TP=N) on the same
model, same run.

    python -m engine.bench [--model DIR] [--batches 1,8,32] [--prompt-len 64] [--new-tokens 64]
                           [--decode-attention auto|dense|paged] [--repeats 3] [--tp N | --pp N]

With --tp N the engine at TP=1 (N threads) is measured against the engine at TP=N (N processes of
one thread each): the same cores, split differently. With --pp N, the same for PP=N, on a stream
of prefill batches and on decode micro-batches, with the time the stages overlapped
(engine/bench_pipeline.py).

Both sides get the same random prompts (equal lengths, so transformers needs no padding) and
generate exactly --new-tokens tokens greedily (EOS ignored). Prefill throughput is prompt tokens
over the time to the first token; decode throughput is the remaining tokens over the remaining
time. transformers runs `generate` with its default KV cache, batched. Each row ends with the cores
the hypervisor stole while it ran (/proc/stat steal): figures from a row with much stolen are low.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from engine.bench_pipeline import decode_stream, prefill_stream, report
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from measure.cpu_usage import snapshot, usage


class Throughput(NamedTuple):
    prefill_tok_s: float
    decode_tok_s: float


def bench_engine(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Throughput:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seqs = [Sequence(p, params) for p in prompts]
    t0 = time.perf_counter()
    engine.prefill(seqs)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        engine.decode_step(seqs)
    t2 = time.perf_counter()
    for seq in seqs:
        engine.free(seq)
    b, s = len(prompts), len(prompts[0])
    return Throughput(b * s / (t1 - t0), b * (new_tokens - 1) / (t2 - t1))


def bench_transformers(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> Throughput:
    ids = torch.tensor(prompts)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)  # type: ignore[operator]
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)  # type: ignore[operator]
        t2 = time.perf_counter()
    b, s = len(prompts), len(prompts[0])
    prefill_s = t1 - t0
    return Throughput(b * s / prefill_s, b * (new_tokens - 1) / max((t2 - t1) - prefill_s, 1e-9))


class Side(NamedTuple):
    """One side of a comparison: its name, how to measure it, and the torch threads it runs on."""

    name: str
    measure: Callable[[list[list[int]], int], Throughput]
    threads: int


def compare(
    a: Side, b: Side, batches: list[int], prompt_len: int, new_tokens: int, repeats: int, vocab: int
) -> None:
    """Prints a row per batch size: each side's best of `repeats` alternating runs, and the ratio."""
    gen = torch.Generator().manual_seed(0)
    print(
        f"{'batch':>5} | {a.name + ' prefill':>16} {b.name + ' prefill':>16} {'ratio':>6} | "
        f"{a.name + ' decode':>15} {b.name + ' decode':>15} {'ratio':>6}  (tok/s)"
    )
    for batch in batches:
        before = snapshot()
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()
        runs: dict[str, list[Throughput]] = {a.name: [], b.name: []}
        for side in (a, b):  # warm-up
            torch.set_num_threads(side.threads)
            side.measure(prompts[:1], 4)
        # Alternate the two so that both see the same machine state (this host is shared and noisy).
        for _ in range(repeats):
            for side in (a, b):
                torch.set_num_threads(side.threads)
                runs[side.name].append(side.measure(prompts, new_tokens))
        x, y = (max(runs[s.name], key=lambda t: t.decode_tok_s) for s in (a, b))
        print(
            f"{batch:>5} | {x.prefill_tok_s:>16.0f} {y.prefill_tok_s:>16.0f} {x.prefill_tok_s / y.prefill_tok_s:>6.2f} | "
            f"{x.decode_tok_s:>15.0f} {y.decode_tok_s:>15.0f} {x.decode_tok_s / y.decode_tok_s:>6.2f}"
            f"  [{usage(before, snapshot()).cores_stolen:.2f} cores stolen]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-attention", default="auto", choices=["auto", "dense", "paged"])
    parser.add_argument("--repeats", type=int, default=3, help="best of N alternating runs per measurement")
    parser.add_argument("--tp", type=int, default=1, help="compare TP=1 with TP=N instead of transformers")
    parser.add_argument("--pp", type=int, default=1, help="compare PP=1 with PP=N (pipelined) instead")
    parser.add_argument("--stream", type=int, default=8, help="--pp: prefill batches in the stream")
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]

    def engine(tp: int, pp: int = 1) -> LLMEngine:
        config = EngineConfig(
            model_dir=args.model,
            num_blocks=8192,
            max_num_seqs=max(batches),
            decode_attention=args.decode_attention,
            tp_size=tp,
            pp_size=pp,
            num_threads=1 if tp * pp > 1 else None,
        )
        return LLMEngine(config)

    if args.pp > 1:
        pipelines(args.model, engine(1), engine(1, args.pp), batches, args)
        return
    base = engine(1)
    threads = torch.get_num_threads()
    closing: list[LLMEngine] = []
    if args.tp > 1:
        other = engine(args.tp)
        closing.append(other)
        a = Side("TP=1", lambda p, n: bench_engine(base, p, n), args.tp)
        b = Side(f"TP={args.tp}", lambda p, n: bench_engine(other, p, n), 1)
        what = f"TP=1 on {args.tp} threads vs TP={args.tp} on {args.tp} processes of 1 thread"
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        a = Side("engine", lambda p, n: bench_engine(base, p, n), threads)
        b = Side("hf", lambda p, n: bench_transformers(hf, p, n), threads)
        what = f"{threads} threads"
    # Both models live as long as the run: keep full collections from re-scanning them between
    # steps (as the serving models do, triton_glue.freeze_startup_heap). Same for both sides.
    gc.collect()
    gc.freeze()
    print(
        f"model {args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {what}, "
        f"decode attention {'dense' if base.dense else 'paged'}"
    )
    try:
        compare(a, b, batches, args.prompt_len, args.new_tokens, args.repeats, base.model_config.vocab_size)
    finally:
        for e in closing:
            e.close()


def pipelines(
    model: str, base: LLMEngine, pipe: LLMEngine, batches: list[int], args: argparse.Namespace
) -> None:
    """PP=1 (on pp threads) against PP=pp (pp processes of one thread), side by side per batch size."""
    pp, vocab = args.pp, base.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def on(engine: LLMEngine, threads: int | None = None) -> LLMEngine:
        torch.set_num_threads(threads or (pp if engine is base else 1))
        return engine

    # The model's whole-model time t is one device's, as the profiler measures it (one thread):
    # each of the PP=pp instance's stages is such a device running 1/pp of the layers.

    gc.collect()
    gc.freeze()
    print(
        f"model {model}, prompt {args.prompt_len} tokens, PP=1 on {pp} threads vs PP={pp} on {pp} processes of 1 thread"
    )
    try:
        for batch in batches:
            before = snapshot()
            prompts = torch.randint(3, vocab, (max(batch, pp), args.prompt_len), generator=gen).tolist()
            stream = [prompts[:batch]] * args.stream
            alone = (on(base), on(pipe))
            for e in alone:  # warm-up
                on(e)
                prefill_stream(e, stream[:2])
            one, many = prefill_stream(on(base), stream), prefill_stream(on(pipe), stream)
            t = (
                prefill_stream(on(base, 1), stream[:1]).seconds,
                prefill_stream(on(pipe), stream[:1]).seconds,
            )
            print(f"batch {batch}: " + report(f"prefill, {args.stream} batches", one, many, t, pp))
            micro = prompts[: max(batch, pp) // pp]
            one = decode_stream(on(base), prompts, args.new_tokens)
            many = decode_stream(on(pipe), prompts, args.new_tokens)
            steps = 4
            t = (
                decode_stream(on(base, 1), micro, steps).seconds / steps,
                decode_stream(on(pipe), micro, steps).seconds / steps,
            )
            name = f"decode, {len(prompts)} sequences in {pp} micro-batches"
            print(f"batch {batch}: " + report(name, one, many, t, pp))
            print(f"batch {batch}: [{usage(before, snapshot()).cores_stolen:.2f} cores stolen]")
    finally:
        pipe.close()


if __name__ == "__main__":
    main()
