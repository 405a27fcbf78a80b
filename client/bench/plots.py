"""DistServe-style figures: SLO attainment vs rate, and vs SLO scale at a fixed rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt

from client.bench.stats import RequestRecord, attainment

SCALES = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)


def plot(
    out: Path,
    by_model: Mapping[str, Mapping[float, Sequence[RequestRecord]]],
    ttft_slo: float,
    tpot_slo: float,
    target: float,
    scale_rate: float,
    title: str,
) -> Path:
    """Two panels, one line per model: attainment vs rate (SLOs as given) and attainment vs SLO
    scale (both SLOs multiplied) at `scale_rate`."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model, runs in by_model.items():
        rates = sorted(runs)
        left.plot(rates, [attainment(runs[r], ttft_slo, tpot_slo) for r in rates], marker="o", label=model)
        if scale_rate in runs:
            right.plot(
                SCALES,
                [attainment(runs[scale_rate], ttft_slo, tpot_slo, s) for s in SCALES],
                marker="o",
                label=model,
            )
    for ax in (left, right):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("SLO attainment")
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_xlabel("rate (req/s)")
    left.set_title(f"TTFT <= {ttft_slo:g} s and TPOT <= {tpot_slo:g} s")
    right.set_xlabel("SLO scale")
    right.set_title(f"at {scale_rate:g} req/s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
