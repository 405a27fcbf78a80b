"""Tokenizer loading and incremental detokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(model_dir: str | Path) -> Any:
    """The folder's tokenizer exactly as transformers' AutoTokenizer builds it (same special tokens,
    same BOS handling), so prompts tokenize here as they do for transformers users."""
    from transformers import AutoTokenizer  # heavy import: only where a tokenizer is needed

    if (
        not (Path(model_dir) / "tokenizer.json").is_file()
        and not (Path(model_dir) / "tokenizer.model").is_file()
    ):
        raise FileNotFoundError(f"no tokenizer.json in model folder {model_dir}")
    return AutoTokenizer.from_pretrained(str(model_dir))


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that never end inside a UTF-8 character.

    Decodes a sliding window (prefix_offset..end) and emits only what the newest tokens added, and
    only once the text no longer ends with the replacement character that marks a byte sequence
    still incomplete. The concatenation of all pieces plus flush() equals decoding all ids at once.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def push(self, token_ids: list[int]) -> str:
        """Adds tokens; returns the new complete text (possibly empty)."""
        self.ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (bytes that never completed a character decode as U+FFFD)."""
        full = self._decode(self.ids)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        self.read_offset = self.prefix_offset = len(self.ids)
        return rest
