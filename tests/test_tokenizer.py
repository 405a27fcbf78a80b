from __future__ import annotations

from pathlib import Path

from engine.tokenizer import IncrementalDetokenizer, load_tokenizer


def test_incremental_pieces_concatenate_to_the_full_decode(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    text = "Numbers tell stories too: naïve café, 数字, emoji 🚀 and the harbor."
    ids = tok(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([t]) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces), "no piece may end inside a UTF-8 character"
    assert sum(1 for p in pieces if p == "") > 0, "multi-byte characters split over tokens are held back"


def test_bytes_that_never_complete_are_flushed_as_replacement(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    lead_byte = tok.convert_tokens_to_ids("ð")  # byte 0xF0: starts a 4-byte character
    detok = IncrementalDetokenizer(tok)
    assert detok.push([lead_byte]) == ""
    assert detok.flush() == "\ufffd"
