"""A workload: the joint distribution of request lengths, and the arrival process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class WorkloadError(ValueError):
    """A workload that cannot be built (unknown source, malformed file, bad distribution)."""


@dataclass(frozen=True, eq=False)
class Workload:
    """Empirical joint distribution of (prompt length, output length) in tokens."""

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    note: str = ""

    def __post_init__(self) -> None:
        if len(self.prompt_lens) == 0 or len(self.prompt_lens) != len(self.output_lens):
            raise WorkloadError(
                f"workload {self.name}: needs equal, non-empty prompt and output length lists"
            )
        if int(self.prompt_lens.min()) < 1 or int(self.output_lens.min()) < 1:
            raise WorkloadError(f"workload {self.name}: lengths must be >= 1 token")

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n requests drawn with replacement (seeded, so runs are repeatable)."""
        idx = np.random.default_rng(seed).integers(0, len(self.prompt_lens), size=n)
        return self.prompt_lens[idx].astype(np.int64), self.output_lens[idx].astype(np.int64)

    def summary(self) -> dict[str, Any]:
        p, o = self.prompt_lens, self.output_lens
        return {
            "name": self.name,
            "requests": len(p),
            "prompt_mean": float(p.mean()),
            "prompt_p90": float(np.percentile(p, 90)),
            "output_mean": float(o.mean()),
            "output_p90": float(np.percentile(o, 90)),
            "note": self.note,
        }


@dataclass(frozen=True)
class ArrivalProcess:
    """Renewal arrivals: gamma inter-arrival times with coefficient of variation `cv` (1 = Poisson)."""

    cv: float = 1.0

    def __post_init__(self) -> None:
        if not self.cv > 0:
            raise WorkloadError(f"the arrival coefficient of variation must be > 0, got {self.cv}")

    def unit_gaps(self, n: int, seed: int) -> np.ndarray:
        """n inter-arrival gaps with mean 1; times at rate r are cumsum(gaps) / r. Scaling one gap
        sequence for every rate (common random numbers) keeps attainment comparable across rates."""
        shape = 1.0 / (self.cv * self.cv)
        return np.random.default_rng(seed + 7919).gamma(shape, 1.0 / shape, size=n)
