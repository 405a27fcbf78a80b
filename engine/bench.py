"""Prefill and decode throughput of the engine vs transformers on the same model, same run.

    python -m engine.bench [--model DIR] [--batches 1,8,32] [--prompt-len 64] [--new-tokens 64]
                                    [--decode-attention auto|dense|paged] [--repeats 3]

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
from typing import NamedTuple

import torch

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
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(
        model_dir=args.model,
        num_blocks=4096,
        max_num_seqs=max(batches),
        decode_attention=args.decode_attention,
    )
    engine = LLMEngine(config)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    # Both models live as long as the run: keep full collections from re-scanning them between
    # steps (as the serving models do, triton_glue.freeze_startup_heap). Same for both sides.
    gc.collect()
    gc.freeze()
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    print(
        f"model {args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, decode attention {'dense' if engine.dense else 'paged'}"
    )
    print(
        f"{'batch':>5} | {'engine prefill':>14} {'hf prefill':>11} {'ratio':>6} | {'engine decode':>13} {'hf decode':>10} {'ratio':>6}  (tok/s)"
    )
    for b in batches:
        before = snapshot()
        prompts = torch.randint(3, vocab, (b, args.prompt_len), generator=gen).tolist()
        bench_engine(engine, prompts[:1], 4)  # warm-up
        bench_transformers(hf, prompts[:1], 4)
        # Alternate the two so that both see the same machine state (this host is shared and noisy).
        runs = [
            (bench_engine(engine, prompts, args.new_tokens), bench_transformers(hf, prompts, args.new_tokens))
            for _ in range(args.repeats)
        ]
        ours = max((r[0] for r in runs), key=lambda t: t.decode_tok_s)
        ref = max((r[1] for r in runs), key=lambda t: t.decode_tok_s)
        print(
            f"{b:>5} | {ours.prefill_tok_s:>14.0f} {ref.prefill_tok_s:>11.0f} {ours.prefill_tok_s / ref.prefill_tok_s:>6.2f} | "
            f"{ours.decode_tok_s:>13.0f} {ref.decode_tok_s:>10.0f} {ours.decode_tok_s / ref.decode_tok_s:>6.2f}"
            f"  [{usage(before, snapshot()).cores_stolen:.2f} cores stolen]"
        )


if __name__ == "__main__":
    main()
