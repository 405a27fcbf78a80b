"""AIPerf, NVIDIA's LLM benchmark (`make aiperf` installs it in its own environment), against the
generated repository on a real tritonserver, a handful of requests each way:

- through the OpenAI frontend (chat, streaming, --use-server-token-count): the token counts AIPerf
  reports are the server's own (disagg_prompt_tokens_total, disagg_generation_tokens_total);
- through its template endpoint on Triton's /generate_stream of `ensemble`, as TensorRT-LLM users
  benchmark their ensemble. AIPerf 0.13's template endpoint reads no usage from a response, so
  there it reports no server token counts; the server's counters must show every token asked for.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving import metric_values, metrics, write_repository
from tritonserver_fixture import start_tritonserver

from backends.launcher import TritonServer
from client.openai_server import FrontendConfig, FrontendThread

pytestmark = pytest.mark.e2e
AIPERF = Path(__file__).resolve().parents[1] / ".venv-aiperf" / "bin" / "aiperf"
REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS = 6, 24, 12
# The body AIPerf posts to /generate_stream: TensorRT-LLM's names. ignore_eos keeps every request
# to exactly its max_tokens, so the count the server must show is known.
TEMPLATE = (
    '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true, "ignore_eos": true}'
)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("aiperf")
    repo = write_repository(work / "repo", tiny_model_dir, tensorrt_llm_entry_points=("ensemble",))
    srv = start_tritonserver(repo, work)
    yield srv
    srv.stop()


def _tokens(server: TritonServer, model: str) -> tuple[float, float]:
    """The server's (prompt, generated) token counters of a client-facing model."""
    text = metrics(server.metrics_url)
    return (
        sum(metric_values(text, "disagg_prompt_tokens_total", model=model)),
        sum(metric_values(text, "disagg_generation_tokens_total", model=model)),
    )


def _profile(out: Path, tokenizer: Path, *args: str) -> dict[str, Any]:
    """Runs `aiperf profile` for the module's handful of requests; its JSON export."""
    if not AIPERF.is_file():
        pytest.fail("AIPerf is not installed: run `make aiperf` (`make test` does)", pytrace=False)
    cmd = [str(AIPERF), "profile", *args, "--streaming", "--use-server-token-count",
           "--request-count", str(REQUESTS), "--concurrency", "2", "--random-seed", "7",
           "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--output-tokens-mean", str(OUTPUT_TOKENS),
           "--tokenizer", str(tokenizer), "--artifact-dir", str(out), "--ui-type", "none"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "profile_export_aiperf.json").read_text())
    assert report["error_summary"] == [], report["error_summary"]
    assert report["completed_request_count"]["avg"] == REQUESTS
    assert report["time_to_first_token"]["count"] == REQUESTS
    return report


def test_aiperf_through_the_openai_frontend(
    server: TritonServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = FrontendConfig(triton_url=server.grpc_url, port=0, tokenizer_dir=str(tiny_model_dir))
    with FrontendThread(config) as frontend:
        before = _tokens(server, "orchestrator")
        report = _profile(tmp_path, tiny_model_dir, "--model", "orchestrator", "--url", frontend.url,
                          "--endpoint-type", "chat")  # fmt: skip
        after = _tokens(server, "orchestrator")
    assert report["total_isl"]["avg"] == after[0] - before[0] > 0
    assert report["total_osl"]["avg"] == after[1] - before[1] > 0


def test_aiperf_through_the_generate_stream_template(
    server: TritonServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    template = tmp_path / "payload.json"
    template.write_text(TEMPLATE)
    before = _tokens(server, "ensemble")
    report = _profile(tmp_path / "out", tiny_model_dir, "--model", "ensemble", "--url", server.http_url,
                      "--endpoint-type", "template", "--custom-endpoint", "/v2/models/ensemble/generate_stream",
                      "--extra-inputs", f"payload_template:{template}",
                      "--extra-inputs", "response_field:text_output")  # fmt: skip
    after = _tokens(server, "ensemble")
    assert after[0] - before[0] >= REQUESTS * INPUT_TOKENS  # each prompt, with the BOS token if any
    assert after[1] - before[1] == REQUESTS * OUTPUT_TOKENS
    assert report["inter_chunk_latency"]["count"] >= REQUESTS  # streamed: a gap (2+ responses) each
