"""Per-request output text: incremental detokenization plus stop words.

Text that could be the start of a stop word is held back until it is known not to be one, so a
stop word never reaches the client, not even split over two responses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from engine.tokenizer import IncrementalDetokenizer


class Piece(NamedTuple):
    text: str  # new text safe to send now
    stopped: bool  # a stop word appeared: generation must end, text is cut before it


class TextStream:
    def __init__(self, tokenizer: Any, stop_words: tuple[str, ...] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop_words = stop_words
        self._hold = max((len(w) for w in stop_words), default=1) - 1
        self._pending = ""  # decoded but not yet sent
        self.sent = ""
        self.stopped = False

    def push(self, token_ids: list[int]) -> Piece:
        if self.stopped:
            return Piece("", True)
        self._pending += self._detok.push(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended (for a reason other than a stop word)."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True).text

    def _release(self, final: bool) -> Piece:
        # Invariant: the last `_hold` characters of the text so far are never sent before the next
        # push, so any stop word (at most _hold + 1 characters) is found whole inside _pending.
        cut = min((i for i in (self._pending.find(w) for w in self._stop_words) if i >= 0), default=-1)
        if cut >= 0:
            out = self._pending[:cut]
            self.sent += out
            self._pending = ""
            self.stopped = True
            return Piece(out, True)
        keep = 0 if final else min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        self.sent += out
        return Piece(out, False)
