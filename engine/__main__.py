"""Command line: generate text with the engine.

python -m engine generate --model DIR --prompt TEXT [--prompt TEXT ...] --max-tokens N
    [--temperature T --top-k K --top-p P --seed S] [--json] [--timings]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import RequestError
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from engine.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="LLM engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts (batched)")
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, one per line")
    gen.add_argument("--timings", action="store_true", help="print prefill and decode timings")
    return parser


def generate(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = LLMEngine(EngineConfig(model_dir=args.model, device=args.device, dtype=args.dtype))
    tokenizer = load_tokenizer(args.model)
    seqs: list[Sequence] = []
    for prompt in args.prompt:
        try:
            seqs.append(engine.new_sequence(tokenizer(prompt).input_ids, params))
        except RequestError as e:
            print(f"error: prompt {prompt!r}: {e}", file=sys.stderr)
            return 2
    for seq in seqs:
        engine.add(seq)
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    while engine.scheduler.has_work():
        t0 = time.perf_counter()
        result = engine.step()
        dt = time.perf_counter() - t0
        if result.kind == "prefill":
            prefill_s += dt
        else:
            decode_s += dt
            decode_tokens += len(result.outputs)
    for prompt, seq in zip(args.prompt, seqs, strict=True):
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "output_ids": seq.output_ids, "text": text}))
        else:
            print(f"{prompt!r} -> {text!r}  [{len(seq.output_ids)} tokens, {seq.finish_reason}]")
    if args.timings:
        prompt_tokens = sum(s.prompt_len for s in seqs)
        print(
            f"prefill: {prompt_tokens} tokens in {prefill_s * 1e3:.1f} ms ({prompt_tokens / max(prefill_s, 1e-9):.0f} tok/s); "
            f"decode: {decode_tokens} tokens in {decode_s * 1e3:.1f} ms ({decode_tokens / max(decode_s, 1e-9):.0f} tok/s, "
            f"{decode_s * 1e3 / max(1, decode_tokens / len(seqs)):.2f} ms/step at batch {len(seqs)})"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return generate(args)


if __name__ == "__main__":
    raise SystemExit(main())
