"""One client request's response stream (orchestrator and colocated): text pieces, final flag,
finish reason, and what it observed (TTFT, TPOT, latency, token counts)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from backends.common import metrics as M
from backends.common.metrics import NULL, Counter, Histogram, MetricSpec
from backends.common.perf_metrics import PerfMetrics
from backends.common.sink import ResponseSink
from backends.common.text_stream import TextStream
from backends.message import ClientChunk, ClientRequest


class RequestMetrics(NamedTuple):
    """What a client-facing model (orchestrator, colocated) observes per request."""

    ttft: Histogram = NULL  # arrival -> first token sent
    tpot: Histogram = NULL  # mean time per output token after the first, per request
    e2e: Histogram = NULL
    prompt_tokens: Counter = NULL  # the prompt, once its first token is out (it was prefilled)
    generation_tokens: Counter = NULL  # the tokens sent, once the request ends (however it ends)
    failures: Counter = NULL  # requests answered with an error (the models count refusals too)

    @classmethod
    def create(cls, make: Callable[[MetricSpec], Any]) -> RequestMetrics:
        """Every metric, each made from its catalog entry by `make` (triton_glue.Metrics.create)."""
        specs = (M.TTFT, M.TPOT, M.REQUEST_SECONDS, M.PROMPT_TOKENS, M.GENERATION_TOKENS, M.REQUEST_FAILURES)
        return cls(*(make(spec) for spec in specs))


class ClientStream:
    """Streaming: one response per push (the new text, the new ids). Otherwise one response at the
    end with all of it. Either way the last response carries the finish reason and the final flag."""

    def __init__(
        self,
        sink: ResponseSink,
        tokenizer: Any,
        stream: bool,
        stop_words: tuple[str, ...] = (),
        metrics: RequestMetrics | None = None,
        arrived: float | None = None,
        log_probs: bool = False,
        echo: tuple[str, tuple[int, ...]] = ("", ()),
        prompt_len: int = 0,
        perf_metrics: bool = False,
    ) -> None:
        self.sink = sink
        self.prompt_len = prompt_len
        # The prompt's text and ids, put before the output of a non-streaming response
        # (TensorRT-LLM's exclude_input_in_output false).
        self.echo = echo
        # With log_probs every push brings one log-probability per token; responses carry them,
        # and their running sum.
        self.log_probs: list[float] | None = [] if log_probs else None
        self.cum_log_prob = 0.0
        self.stream = stream
        self.text = TextStream(tokenizer, stop_words)
        self.metrics = metrics or RequestMetrics()
        self.arrived = time.perf_counter() if arrived is None else arrived
        # With perf_metrics (return_perf_metrics) the final response carries these; phases record
        # what they measured into it.
        self.perf = PerfMetrics.arrived_at(self.arrived) if perf_metrics else None
        self.ids: list[int] = []
        self.first_at: float | None = None
        self.done = False

    @classmethod
    def of(
        cls,
        req: ClientRequest,
        prompt_ids: Sequence[int],
        sink: ResponseSink,
        tokenizer: Any,
        metrics: RequestMetrics,
        arrived: float,
        include_input: bool = False,
    ) -> ClientStream:
        """The stream of a client request: its streaming flag, stop words and log-probabilities;
        the prompt before a non-streaming output when the request sets exclude_input_in_output
        false, or leaves it unset and `include_input` (the entry point's default) holds."""
        echo: tuple[str, tuple[int, ...]] = ("", ())
        if req.exclude_input is False or (req.exclude_input is None and include_input):
            echo = (str(req.text or tokenizer.decode(list(prompt_ids))), tuple(prompt_ids))
        return cls(
            sink, tokenizer, req.stream, req.stop_words, metrics, arrived, req.params.logprobs, echo,
            prompt_len=len(prompt_ids), perf_metrics=req.perf_metrics,
        )  # fmt: skip

    def push(
        self, token_ids: list[int], finish_reason: str | None = None, log_probs: Sequence[float] = ()
    ) -> bool:
        """Adds generated tokens (finish_reason set on the last ones) and, when the stream carries
        them, their log-probabilities. Returns True when the stream ended: generation finished, or
        a stop word appeared (the caller must stop generating)."""
        if self.done:
            return True
        if self.log_probs is not None and len(log_probs) != len(token_ids):
            raise RuntimeError(f"{len(token_ids)} tokens came with {len(log_probs)} log-probabilities")
        # Token by token, so a stop word ends the ids where it ends the text, however many tokens
        # one push brings (the orchestrator forwards whatever decode sent meanwhile in one).
        text, taken, stopped = "", [], False
        for token in token_ids:
            piece = self.text.push([token])
            text += piece.text
            taken.append(token)
            if piece.stopped:
                stopped = True
                break
        token_ids = taken
        self.ids += token_ids
        new_log_probs = None
        if self.log_probs is not None:
            new_log_probs = tuple(log_probs[: len(taken)])
            self.log_probs += new_log_probs
            self.cum_log_prob += sum(new_log_probs)
        first = self.first_at is None
        if first and self.perf is not None and self.perf.first_token_ns is None:
            self.perf.first_token_ns = time.time_ns()
        if stopped:
            finish_reason = "stop"
        if finish_reason and not stopped:
            text += self.text.finish()
        final = finish_reason is not None
        cum = None if self.log_probs is None else self.cum_log_prob
        ends = self._final_fields() if final else {}
        if self.stream:
            chunk = ClientChunk(
                text_output=text,
                output_ids=tuple(token_ids),
                finish_reason=finish_reason or "",
                output_log_probs=new_log_probs,
                cum_log_probs=cum,
                **ends,
            )
            self.sink.send(chunk, final=final)
        elif final:
            whole = ClientChunk(
                text_output=self.echo[0] + self.text.sent,
                output_ids=self.echo[1] + tuple(self.ids),
                finish_reason=finish_reason or "",
                output_log_probs=None if self.log_probs is None else tuple(self.log_probs),
                cum_log_probs=cum,
                **ends,
            )
            self.sink.send(whole, final=True)
        # Timed after the send returns: what the client sees, including waits for the sender (for
        # a sink from an Outbox, the colocated model's, when the response was handed over to it).
        now = time.perf_counter()
        if first:
            self.first_at = now
            self.metrics.ttft.observe(now - self.arrived)
            self.metrics.prompt_tokens.increment(self.prompt_len)
        if final:
            self._close(now)
        return final

    def _final_fields(self) -> dict[str, int]:
        """What only the final response carries: TensorRT-LLM's batch and sequence index (one
        request per batch row, one sequence per request) and, when asked for, the perf metrics."""
        fields = {"batch_index": 0, "sequence_index": 0}
        if self.perf is not None:
            fields.update(self.perf.outputs())
        return fields

    def error(self, message: str) -> None:
        if not self.done:
            self._end()
            self.metrics.failures.increment(1)
            self.sink.error(message)

    def cancelled(self) -> None:
        """The client cancelled: nothing more is sent (its tokens so far are counted)."""
        if not self.done:
            self._end()

    def is_cancelled(self) -> bool:
        return self.sink.is_cancelled()

    def _end(self) -> None:
        self.done = True
        if self.ids:
            self.metrics.generation_tokens.increment(len(self.ids))

    def _close(self, now: float) -> None:
        self._end()
        assert self.first_at is not None
        if len(self.ids) > 1:
            self.metrics.tpot.observe((now - self.first_at) / (len(self.ids) - 1))
        self.metrics.e2e.observe(now - self.arrived)
