"""The OpenAI-compatible frontend with the official `openai` package, on a real tritonserver."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from serving import write_repository
from tritonserver_fixture import start_tritonserver

from client import SamplingParams, make_client
from client.openai_server import FrontendConfig, FrontendThread

pytestmark = pytest.mark.e2e
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(Triton gRPC url, frontend url)."""
    work = tmp_path_factory.mktemp("openai")
    server = start_tritonserver(write_repository(work / "repo", tiny_model_dir), work)
    try:
        config = FrontendConfig(triton_url=server.grpc_url, port=0, tokenizer_dir=str(tiny_model_dir))
        with FrontendThread(config) as frontend:
            yield server.grpc_url, frontend.url
    finally:
        server.stop()


@pytest.fixture
def oai(stack: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack[1] + "/v1", api_key="unused", max_retries=0)


def test_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["orchestrator", "colocated"]


@pytest.mark.parametrize("model", ["orchestrator", "colocated"])
def test_completions_match_the_client(stack: tuple[str, str], oai: openai.OpenAI, model: str) -> None:
    with make_client(stack[0]) as c:
        ref = c.generate(PROMPT, SamplingParams(max_tokens=12), model=model)
    whole = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, stream=True))
    # At most a chunk per token: tokens that queued behind a slow send arrive together (the
    # orchestrator always streams the first token on its own).
    assert (2 if model == "orchestrator" else 1) <= len(chunks) <= 12
    assert "".join(ch.choices[0].text for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    by_ids = oai.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=4)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 4


def test_chat_streaming_and_not(oai: openai.OpenAI) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about harbors"},
    ]
    whole = oai.chat.completions.create(model="orchestrator", messages=messages, max_tokens=10)  # type: ignore[arg-type]
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content and whole.choices[0].finish_reason == "length"
    chunks = list(
        oai.chat.completions.create(
            model="orchestrator",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert whole.usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_words_end_with_stop(stack: tuple[str, str], oai: openai.OpenAI) -> None:
    full = oai.completions.create(model="orchestrator", prompt=PROMPT, max_tokens=20).choices[0].text
    word = full[len(full) // 2 :].strip()[:3]
    assert word
    got = oai.completions.create(model="orchestrator", prompt=PROMPT, max_tokens=20, stop=[word])
    assert got.choices[0].finish_reason == "stop" and word not in got.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_openai_errors(oai: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="gpt-4", prompt="x", stream=stream)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="the context is 2048"):
        oai.completions.create(model="orchestrator", prompt=[5] * 2100, max_tokens=2, stream=stream)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
        oai.completions.create(model="orchestrator", prompt="x", max_tokens=0, stream=stream)
    with pytest.raises(openai.BadRequestError, match="n=1") as n2:
        oai.completions.create(model="orchestrator", prompt="x", n=2, stream=stream)
    assert n2.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model="orchestrator", messages=[], stream=stream)


def test_penalties_min_tokens_ignore_eos_and_seed(stack: tuple[str, str], oai: openai.OpenAI) -> None:
    """The options reach the engine: the same output as our client sending the same tensors, and
    different from the output without them."""
    extra = {"repetition_penalty": 0.6, "min_tokens": 4, "ignore_eos": True}
    kw = {"presence_penalty": -0.5, "frequency_penalty": 0.3, "seed": 5}
    got = oai.completions.create(model="orchestrator", prompt=PROMPT, max_tokens=12, extra_body=extra, **kw)
    params = SamplingParams(max_tokens=12, repetition_penalty=0.6, presence_penalty=-0.5, frequency_penalty=0.3,
                            min_tokens=4, ignore_eos=True, seed=5)  # fmt: skip
    with make_client(stack[0]) as c:
        ref = c.generate(PROMPT, params, model="colocated")
        plain = c.generate(PROMPT, SamplingParams(max_tokens=12), model="colocated")
    assert got.choices[0].text == ref.text != plain.text


def test_logprobs_for_chat_and_completions(stack: tuple[str, str], oai: openai.OpenAI) -> None:
    """Each token's log-probability, streaming and not, equal to what the server sends our client
    (output_log_probs); alternatives are refused by name."""
    with make_client(stack[0]) as c:
        pieces = list(c.stream(PROMPT, SamplingParams(max_tokens=8, logprobs=True), model="orchestrator"))
    want = [lp for p in pieces for lp in p.log_probs]
    assert len(want) == 8 and all(lp <= 0 for lp in want)
    whole = oai.completions.create(model="orchestrator", prompt=PROMPT, max_tokens=8, logprobs=0)
    got = whole.choices[0].logprobs
    assert got is not None and got.token_logprobs == pytest.approx(want, abs=1e-4)
    assert got.tokens is not None and "".join(got.tokens) == whole.choices[0].text
    chunks = list(
        oai.completions.create(model="orchestrator", prompt=PROMPT, max_tokens=8, logprobs=0, stream=True)
    )
    streamed = [lp for ch in chunks for lp in (ch.choices[0].logprobs.token_logprobs or [])]  # type: ignore[union-attr]
    assert streamed == pytest.approx(want, abs=1e-4)
    messages = [{"role": "user", "content": PROMPT}]
    chat = oai.chat.completions.create(model="colocated", messages=messages, max_tokens=6, logprobs=True)  # type: ignore[arg-type]
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert (
        content is not None
        and len(content) == 6
        and all(t.logprob <= 0 and t.top_logprobs == [] for t in content)
    )
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    plain = oai.chat.completions.create(model="colocated", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs") as err:
        oai.chat.completions.create(model="colocated", messages=messages, logprobs=True, top_logprobs=2)  # type: ignore[arg-type]
    assert err.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="alternatives"):
        oai.completions.create(model="orchestrator", prompt=PROMPT, max_tokens=4, logprobs=2)


def test_models_by_id_and_health(stack: tuple[str, str], oai: openai.OpenAI) -> None:
    assert oai.models.retrieve("colocated").id == "colocated"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")
    with urllib.request.urlopen(stack[1] + "/health", timeout=30) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"temperature": 5}, "temperature", "between 0 and 2"),
        ({"presence_penalty": 2.5}, "presence_penalty", "between -2 and 2"),
        ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "min_tokens must be in"),
        (
            {"response_format": {"type": "json_object"}},
            "response_format",
            "'response_format' is not supported",
        ),
        ({"frobnicate": 1}, "frobnicate", "'frobnicate' is not supported"),
        ({"ignore_eos": "yes"}, "ignore_eos", "must be a boolean"),
    ],
)
def test_options_out_of_range_or_unknown_are_refused_by_name(
    oai: openai.OpenAI, body: dict[str, object], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as err:
        oai.chat.completions.create(
            model="orchestrator", messages=[{"role": "user", "content": "hi"}], extra_body=body
        )
    assert err.value.param == param


def test_raw_http_errors(stack: tuple[str, str]) -> None:
    def post(path: str, data: bytes) -> tuple[int, dict[str, object]]:
        req = urllib.request.Request(stack[1] + path, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post("/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in str(body["error"])
    status, body = post("/v1/nothing", b"{}")
    assert status == 404 and "error" in body


@pytest.mark.parametrize("model", ["orchestrator", "colocated"])
def test_chat_without_max_tokens_may_use_the_rest_of_the_context(oai: openai.OpenAI, model: str) -> None:
    """As with OpenAI and vLLM, a chat without max_tokens may run to the end of the context: the
    tiny model's 2048 tokens here (the KV pools hold more). A prompt that fills it is refused."""
    words = "one two three four five six seven eight nine ten "
    messages = [{"role": "user", "content": words * 165}]
    reply = oai.chat.completions.create(model=model, messages=messages, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.prompt_tokens + reply.usage.completion_tokens == 2048
    assert reply.usage.completion_tokens > 16  # beyond the completions' default
    with pytest.raises(openai.BadRequestError, match="context of 2048 leaves no room") as err:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": words * 175}])
    assert err.value.param == "messages"
