"""The chat path with a real instruct model: SmolLM2-135M-Instruct served disaggregated by a real
tritonserver, asked through the OpenAI-compatible frontend with the official `openai` package."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tritonserver_fixture import start_tritonserver

from client.openai_server import FrontendConfig, FrontendThread
from planner.deployment import default_deployment
from planner.repository import write_repository

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def frontend_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("chat")
    # Prefill, decode and the orchestrator (no colocated model: one engine fewer to load).
    dep = dataclasses.replace(default_deployment(str(smollm2_dir), num_blocks=64), colocated=None)
    write_repository(dep, work / "repo")
    server = start_tritonserver(work / "repo", work)
    try:
        config = FrontendConfig(
            triton_url=server.grpc_url, port=0, models=("orchestrator",), tokenizer_dir=str(smollm2_dir)
        )
        with FrontendThread(config) as frontend:
            yield frontend.url
    finally:
        server.stop()


@pytest.fixture
def oai(frontend_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=frontend_url + "/v1", api_key="unused", max_retries=0)


def test_chat_answers_paris(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="orchestrator", messages=QUESTION, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    text = reply.choices[0].message.content or ""
    assert "Paris" in text, text
    assert reply.choices[0].finish_reason == "stop", "the answer ends at <|im_end|>, well before 32 tokens"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens < 32


def test_streamed_chat_answers_paris_with_the_same_text(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model="orchestrator", messages=QUESTION, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        oai.chat.completions.create(
            model="orchestrator",
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=32,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text and text == whole.choices[0].message.content
    assert len(chunks) > 2, "a streamed answer comes in pieces"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_without_max_tokens_answers_past_16_tokens(oai: openai.OpenAI) -> None:
    """No max_tokens: the answer may use the rest of the context (1024 tokens, the KV pool here),
    not the completions' default of 16, and ends where the model ends it."""
    count = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    reply = oai.chat.completions.create(model="orchestrator", messages=count, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 16
    assert (reply.choices[0].message.content or "").rstrip().endswith("20")  # it counted to the end
