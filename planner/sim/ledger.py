"""The requests being simulated, what happened to each of them, and the GPUs' busy time."""

from __future__ import annotations

import numpy as np

from planner.sim_stats import SimResult


class BusyTime:
    """Seconds the instances spent computing, summed over instances in event order.

    One accumulator per phase, shared by all instances: the order of the float additions is part
    of the pinned results."""

    __slots__ = ("decode_s", "prefill_s")

    def __init__(self) -> None:
        self.prefill_s = 0.0  # prefill batches (disaggregated: stage time x stages)
        self.decode_s = 0.0  # decode segments (disaggregated or colocated)


class Requests:
    """Per-request inputs (lengths in tokens, arrival times in seconds) and outcomes.

    Indexed by request number; plain lists, not arrays: the simulator reads them one element at a
    time and list indexing is several times faster than numpy scalar access."""

    __slots__ = (
        "arrivals",
        "completions",
        "finish",
        "first_token",
        "kv_source_node",
        "output_lens",
        "prompt_lens",
        "ttft",
    )

    def __init__(self, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray) -> None:
        n = len(arrivals)
        self.arrivals: list[float] = arrivals.tolist()
        self.prompt_lens = [int(x) for x in prompts]
        self.output_lens = [int(x) for x in outputs]  # >= 1; the first one comes out of the prefill
        self.ttft = [float("nan")] * n
        self.first_token = [0.0] * n  # time of the first token
        self.finish = [float("nan")] * n  # time of the last token
        self.completions = [0] * n  # finishes; exactly 1 at the end of a correct run
        self.kv_source_node = [-1] * n  # node the KV cache is pulled from (-1: another node)

    def first_token_out(self, i: int, t: float) -> None:
        """The prefill of request i produced its first token at t."""
        self.ttft[i] = t - self.arrivals[i]
        self.first_token[i] = t

    def complete(self, i: int, t: float) -> None:
        """The last token of request i came out at t."""
        self.finish[i] = t
        self.completions[i] += 1

    def result(self, outputs: np.ndarray, busy: BusyTime, prefill_only: bool) -> SimResult:
        """The per-request arrays; TPOT = (last token - first token) / (output tokens - 1)."""
        finish = np.array(self.finish)
        first = np.array(self.first_token)
        out = np.asarray(outputs, dtype=np.float64)
        tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
        if prefill_only:
            tpot = np.zeros(len(self.ttft))
        completions = np.array(self.completions, dtype=np.int64)
        return SimResult(np.array(self.ttft), tpot, finish, completions, (busy.prefill_s, busy.decode_s))
