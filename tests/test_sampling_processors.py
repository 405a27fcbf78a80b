"""Penalties, min_tokens and log-probabilities against transformers' logits processors, greedy,
on the default model: the same tokens, token for token, and the same log-probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import RequestError
from engine.sampling import Draw, SamplingParams, adjust

NEW_TOKENS = 24
PROMPTS = [[1, 5, 9, 5, 9, 5, 9], [1, *range(40, 72)], [1, 300, 301, 302, 300, 301]]


class OpenAIPenalties:
    """presence/frequency penalties as OpenAI and vLLM define them, over the generated tokens only:
    logit -= frequency * count + presence * (count > 0). transformers has no processor for them."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, ids in enumerate(input_ids[:, self.prompt_len :]):
            counts = torch.bincount(ids, minlength=scores.shape[-1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_generate(model: Any, prompt: list[int], **kw: Any) -> tuple[list[int], list[float]]:
    """One prompt at a time (padding would enter the repetition penalty's history): the new
    tokens and their log-probabilities (compute_transition_scores, normalized)."""
    from transformers import LogitsProcessorList

    presence, frequency = kw.pop("presence", 0.0), kw.pop("frequency", 0.0)
    processors = LogitsProcessorList(
        [OpenAIPenalties(len(prompt), presence, frequency)] if presence or frequency else []
    )
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, do_sample=False, pad_token_id=0, logits_processor=processors, output_scores=True,
        return_dict_in_generate=True, **kw,
    )  # fmt: skip
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return out.sequences[0, len(prompt) :].tolist(), scores[0].tolist()


def engine_generate(model_dir: Path, params: list[SamplingParams]) -> list[tuple[list[int], list[float]]]:
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), num_blocks=256, block_size=4))
    seqs = engine.generate(PROMPTS, params)  # one batch, each row its own parameters
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return [(s.output_ids, s.output_logprobs) for s in seqs]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
        ({"presence_penalty": 1.5, "frequency_penalty": 0.6}, {"presence": 1.5, "frequency": 0.6}),
        (
            {"repetition_penalty": 1.3, "presence_penalty": -0.4, "frequency_penalty": 0.9},
            {"repetition_penalty": 1.3, "presence": -0.4, "frequency": 0.9},
        ),
    ],
    ids=["repetition", "repetition-below-1", "presence-frequency", "all-three"],
)
def test_penalties_match_transformers(
    tiny_model_dir: Path, hf_model: Any, ours: dict[str, float], theirs: dict[str, float]
) -> None:
    # Row 0 has no penalty: one batch mixes penalized and plain rows.
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)] + [
        SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True, **ours)  # type: ignore[arg-type]
    ] * 2
    got = engine_generate(tiny_model_dir, params)
    plain = hf_generate(hf_model, PROMPTS[0], max_new_tokens=NEW_TOKENS)
    assert got[0][0] == plain[0]
    for prompt, (tokens, logprobs) in zip(PROMPTS[1:], got[1:], strict=True):
        want, want_logprobs = hf_generate(hf_model, prompt, max_new_tokens=NEW_TOKENS, **dict(theirs))
        assert tokens == want
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    unpenalized = engine_generate(tiny_model_dir, [params[0]] * 3)
    for (tokens, logprobs), (plain_tokens, plain_logprobs) in zip(got[1:], unpenalized[1:], strict=True):
        # the penalty changed the tokens, or at least the distribution they were drawn from
        assert tokens != plain_tokens or logprobs != pytest.approx(plain_logprobs, abs=1e-3)


def test_min_tokens_matches_transformers(tiny_model_dir: Path, hf_model: Any) -> None:
    # Make a token that greedy decoding reaches early an end token: without min_tokens generation
    # stops there, with min_tokens=12 it may not before 12 tokens.
    free = engine_generate(tiny_model_dir, [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)] * 3)
    first = free[1][0]
    k = next(i for i in range(2, NEW_TOKENS) if first[i] not in first[:i])
    stop = first[k]
    eos = [hf_model.generation_config.eos_token_id or 2, stop]
    ours = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop,), min_tokens=12)
    tokens = engine_generate(tiny_model_dir, [ours] * 3)[1][0]
    want, _ = hf_generate(
        hf_model, PROMPTS[1], max_new_tokens=NEW_TOKENS, min_new_tokens=12, eos_token_id=eos
    )
    assert tokens == want
    assert len(tokens) > k + 1 and stop not in tokens[:12]
    short = engine_generate(
        tiny_model_dir, [SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop,))] * 3
    )
    assert short[1][0] == first[: k + 1]


def test_bad_words_match_transformers(tiny_model_dir: Path, hf_model: Any) -> None:
    """A one-token bad word and a two-token one taken from the free output: neither appears, and
    the tokens equal transformers' generate(bad_words_ids=...)."""
    free = engine_generate(tiny_model_dir, [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)] * 3)[1][0]
    words = ((free[3],), (free[6], free[7]))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, bad_words=words)
    tokens = engine_generate(tiny_model_dir, [params] * 3)[1][0]
    want, _ = hf_generate(
        hf_model, PROMPTS[1], max_new_tokens=NEW_TOKENS, bad_words_ids=[list(w) for w in words]
    )
    assert tokens == want and tokens != free
    assert free[3] not in tokens
    assert all(tokens[i : i + 2] != list(words[1]) for i in range(len(tokens) - 1))


def test_greedy_logprobs_match_transformers(tiny_model_dir: Path, hf_model: Any) -> None:
    got = engine_generate(
        tiny_model_dir, [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)] * 3
    )
    for prompt, (tokens, logprobs) in zip(PROMPTS, got, strict=True):
        want, want_logprobs = hf_generate(hf_model, prompt, max_new_tokens=NEW_TOKENS)
        assert tokens == want and len(logprobs) == len(tokens)
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
        assert all(lp <= 0 for lp in logprobs)


def test_adjust_by_hand() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    draw = Draw(SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5,
                               min_tokens=3, stop_token_ids=(4,)), 0, [0, 1], [2, 2])  # fmt: skip
    got = adjust(logits, draw, end_ids=[3])
    # 0, 1 seen (prompt), 2 seen (output twice): 2/2, -1*2, 0.5/2 - 0.25 - 2*0.5; 3 and 4 banned.
    assert got.tolist() == [1.0, -2.0, 0.25 - 0.25 - 1.0, float("-inf"), float("-inf")]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, 1.0]  # the input is not modified
    late = Draw(draw.params, 0, [0, 1], [2, 2, 2])  # 3 tokens made: min_tokens no longer bans
    assert adjust(logits, late, end_ids=[3])[3] == 3.0


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
        ({"presence_penalty": float("nan")}, "presence_penalty must be a finite number"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty must be a finite number"),
        ({"min_tokens": 20, "max_tokens": 10}, r"min_tokens must be an integer in \[0, max_tokens=10\]"),
        ({"min_tokens": -1}, "min_tokens must be"),
        ({"bad_words": ((),)}, "bad_words must be non-empty sequences"),
    ],
)
def test_bad_values_are_refused_by_name(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kw)
