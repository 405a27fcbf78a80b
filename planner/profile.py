"""Latency profiles: load, validate and save the JSON format of DistServe's published profiles.

Format (times in milliseconds): {model: {tp: {"prefill": [a, b, c], "decoding_smallbs": [a, b, c],
"decoding_largebs": [a, b, c], "decoding_large_small_bs_threshold": int}}}.
- prefill time = a + b*S + c*S2 (S = sum of prompt lengths in the batch, S2 = sum of squares);
- decode step time = a + b*T + c*B (T = sum over the batch of context length + 1, B = batch size);
  the small-batch coefficients apply while B <= threshold.
Files written by our profiler and the published ones are interchangeable."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner import PlannerError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = PROFILE_DIR / "profiler-a100-80g.distserve.json"
VLLM_PROFILE = PROFILE_DIR / "profiler-a100-80g.vllm.json"  # vLLM's measured profile, same format
_KEYS = ("prefill", "decoding_smallbs", "decoding_largebs")


@dataclass(frozen=True)
class TpProfile:
    """Coefficients of one model at one tensor-parallel degree (ms)."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int
    # Per-iteration serving overhead (ms): what the serving loop adds to every prefill batch and
    # decode step beyond the timed forward pass. Optional in the file ("serving_overhead_ms"),
    # absent from DistServe's published profiles (0).
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        for name, coef in (("prefill", self.prefill), ("decode_small", self.decode_small)):
            if len(coef) != 3 or not all(math.isfinite(x) for x in coef):
                raise PlannerError(f"{name} needs three finite coefficients, got {coef!r}")
        if len(self.decode_large) != 3 or not all(math.isfinite(x) for x in self.decode_large):
            raise PlannerError(f"decode_large needs three finite coefficients, got {self.decode_large!r}")
        if self.threshold < 1:
            raise PlannerError(f"decoding_large_small_bs_threshold must be >= 1, got {self.threshold}")
        if not (math.isfinite(self.overhead_ms) and self.overhead_ms >= 0):
            raise PlannerError(f"serving_overhead_ms must be a finite number >= 0, got {self.overhead_ms}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decoding_large_small_bs_threshold": self.threshold,
            "prefill": list(self.prefill),
            "decoding_smallbs": list(self.decode_small),
            "decoding_largebs": list(self.decode_large),
        }
        if self.overhead_ms:
            out["serving_overhead_ms"] = self.overhead_ms
        return out


@dataclass(frozen=True)
class Profile:
    """All models of one profile file: model name -> tp -> coefficients."""

    models: dict[str, dict[int, TpProfile]] = field(default_factory=dict)
    source: str = ""

    def find_model(self, name: str) -> str | None:
        """The profile's key for `name`: exact, or the same short name ("opt-13b")."""
        if name in self.models:
            return name
        short = name.split("/")[-1].lower()
        for key in self.models:
            if key.split("/")[-1].lower() == short:
                return key
        return None

    def for_model(self, name: str) -> dict[int, TpProfile]:
        key = self.find_model(name)
        if key is None:
            have = ", ".join(sorted(self.models)) or "none"
            raise PlannerError(
                f"the profile {self.source or '(in memory)'} has no entry for model {name!r} "
                f"(it has: {have}); run `python -m planner profile` on the target hardware"
            )
        return self.models[key]

    def to_json(self) -> dict[str, Any]:
        return {
            m: {str(tp): p.to_json() for tp, p in sorted(tps.items())}
            for m, tps in sorted(self.models.items())
        }


def _triple(obj: Any, where: str) -> tuple[float, float, float]:
    if not isinstance(obj, list) or len(obj) != 3 or not all(isinstance(x, (int, float)) for x in obj):
        raise PlannerError(f"{where}: expected a list of three numbers, got {obj!r}")
    a, b, c = (float(x) for x in obj)
    return a, b, c


def parse_profile(data: Any, source: str = "") -> Profile:
    """Validate a decoded profile JSON object; every error names the offending entry."""
    if not isinstance(data, dict) or not data:
        raise PlannerError(f"malformed profile {source}: expected a non-empty object of models")
    models: dict[str, dict[int, TpProfile]] = {}
    for model, tps in data.items():
        if not isinstance(tps, dict) or not tps:
            raise PlannerError(f"malformed profile {source}: {model} must map tp degrees to coefficients")
        parsed: dict[int, TpProfile] = {}
        for tp_key, entry in tps.items():
            where = f"malformed profile {source}: {model} tp={tp_key}"
            if not str(tp_key).isdigit() or int(tp_key) < 1:
                raise PlannerError(f"{where}: tp must be a positive integer")
            if not isinstance(entry, dict):
                raise PlannerError(f"{where}: expected an object")
            missing = [k for k in (*_KEYS, "decoding_large_small_bs_threshold") if k not in entry]
            if missing:
                raise PlannerError(f"{where}: missing {', '.join(missing)}")
            threshold = entry["decoding_large_small_bs_threshold"]
            if not isinstance(threshold, (int, float)) or threshold != int(threshold):
                raise PlannerError(f"{where}: decoding_large_small_bs_threshold must be an integer")
            overhead = entry.get("serving_overhead_ms", 0.0)
            if not isinstance(overhead, (int, float)) or isinstance(overhead, bool):
                raise PlannerError(f"{where}: serving_overhead_ms must be a number")
            try:
                parsed[int(tp_key)] = TpProfile(
                    prefill=_triple(entry["prefill"], f"{where} prefill"),
                    decode_small=_triple(entry["decoding_smallbs"], f"{where} decoding_smallbs"),
                    decode_large=_triple(entry["decoding_largebs"], f"{where} decoding_largebs"),
                    threshold=int(threshold),
                    overhead_ms=float(overhead),
                )
            except PlannerError as exc:
                raise PlannerError(f"{where}: {exc}") from exc
        models[str(model)] = parsed
    return Profile(models=models, source=source)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise PlannerError(f"profile {p} not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlannerError(f"malformed profile {p}: not valid JSON ({exc})") from exc
    return parse_profile(data, str(p))


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")
