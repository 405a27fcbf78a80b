"""Least-squares fits of the profile coefficients, minimizing RELATIVE error (so short batches,
which dominate decode, weigh as much as long ones).

Every coefficient is constrained to be >= 0 (non-negative least squares): a step cannot get faster
with more tokens, more context or more sequences, and a fixed cost cannot be negative. Unconstrained,
timing noise on a busy host can tilt a fit negative (a decode step of 16 sequences "faster" than one
of a single sequence), and the planner would then trust an impossible extrapolation."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import nnls

from planner import PlannerError
from planner.profile import TpProfile


class FitError(NamedTuple):
    """Relative error of a fit over its samples."""

    mean: float
    max: float
    samples: int


class PrefillSample(NamedTuple):
    sum_len: int
    sum_sq: int
    ms: float


class DecodeSample(NamedTuple):
    sum_ctx_plus_one: int  # T
    batch: int  # B
    ms: float


def _rel_lstsq(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_{c >= 0} sum(((features @ c) - y) / y)^2: least squares on rows scaled by 1/y."""
    if np.any(y <= 0):
        raise PlannerError("measured times must be positive")
    coef, _ = nnls(features / y[:, None], np.ones_like(y))
    return np.asarray(coef, dtype=float)


def _err(features: np.ndarray, y: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return np.abs(features @ coef - y) / y


def fit_prefill(samples: list[PrefillSample]) -> tuple[tuple[float, float, float], FitError]:
    """time = a + b*S + c*S2."""
    if len(samples) < 3:
        raise PlannerError("the prefill fit needs at least 3 samples")
    x = np.array([[1.0, s.sum_len, s.sum_sq] for s in samples])
    y = np.array([s.ms for s in samples])
    # Scale the columns so lstsq is well conditioned (S2 reaches 1e7), then unscale.
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    coef = _rel_lstsq(x / scale, y) / scale
    e = _err(x, y, coef)
    a, b, c = (float(v) for v in coef)
    return (a, b, c), FitError(float(e.mean()), float(e.max()), len(samples))


def _fit_decode_part(samples: list[DecodeSample]) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([[1.0, s.sum_ctx_plus_one, s.batch] for s in samples])
    y = np.array([s.ms for s in samples])
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    coef = _rel_lstsq(x / scale, y) / scale
    return coef, _err(x, y, coef)


def fit_decode(samples: list[DecodeSample]) -> tuple[TpProfile, FitError]:
    """time = a + b*T + c*B with a small-batch and a large-batch regime: the threshold is the batch
    size that minimizes the total squared relative error (one regime when that is best).
    The returned profile's prefill coefficients are placeholders (zeros)."""
    if len(samples) < 3:
        raise PlannerError("the decode fit needs at least 3 samples")
    batches = sorted({s.batch for s in samples})
    coef_all, err_all = _fit_decode_part(samples)
    best = (float(np.sum(err_all**2)), batches[-1], coef_all, coef_all, err_all)
    for thr in batches[:-1]:
        small = [s for s in samples if s.batch <= thr]
        large = [s for s in samples if s.batch > thr]
        # Each regime needs three distinct (T, B) directions to be determined.
        if (
            len({s.batch for s in small}) < 2
            or len({s.batch for s in large}) < 2
            or min(len(small), len(large)) < 4
        ):
            continue
        c_s, e_s = _fit_decode_part(small)
        c_l, e_l = _fit_decode_part(large)
        total = float(np.sum(e_s**2) + np.sum(e_l**2))
        if total < best[0] * 0.9:  # a second regime must pay for itself
            best = (total, thr, c_s, c_l, np.concatenate([e_s, e_l]))
    _, thr, c_s, c_l, err = best

    def triple(c: np.ndarray) -> tuple[float, float, float]:
        return float(c[0]), float(c[1]), float(c[2])

    prof = TpProfile((0.0, 0.0, 0.0), triple(c_s), triple(c_l), int(thr))
    return prof, FitError(float(err.mean()), float(err.max()), len(samples))
