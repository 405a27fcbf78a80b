"""Shared fixtures: the default model and small random checkpoints made with transformers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.launcher import TritonServer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "tiny-llama"
SMOLLM2_MODEL = ROOT / "models" / "smollm2-135m-instruct"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that used a tritonserver gets the server's log tail in its report (stub
    tracebacks and crashes land there): without it a hang in CI shows only the client's side."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, TritonServer):
            report.sections.append((f"tritonserver log {value.log_path}", value.log_tail(120)))
            report.sections.append(("python stacks of the server's models", _stub_stacks(value)))


def _stub_stacks(server: TritonServer) -> str:
    """What every python-backend stub of `server` is doing (a hang shows where it waits)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists() or not server.is_running():
        return "(py-spy not installed or server not running)"
    children = subprocess.run(
        ["pgrep", "-P", str(server.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    out = []
    for pid in children:
        dump = subprocess.run(
            [str(py_spy), "dump", "--pid", pid], capture_output=True, text=True, timeout=60, check=False
        )
        out.append(dump.stdout or dump.stderr)
    return "\n".join(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model (built by `make model`; built here if missing)."""
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    from engine.tiny import build

    return build(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (built by `make model-smollm2`; built here the same way if missing)."""
    if not (SMOLLM2_MODEL / "config.json").is_file():
        from engine.smollm2 import DEFAULT_CACHE, build

        build(SMOLLM2_MODEL, ROOT / DEFAULT_CACHE)
    return SMOLLM2_MODEL


def make_random_checkpoint(out: Path, kind: str, **overrides: Any) -> Path:
    """A random checkpoint written by transformers itself (no download), with weights scaled up
    so that greedy decoding does not collapse to one token."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    args: dict[str, Any] = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=320,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    args.update(overrides)
    torch.manual_seed(1234)
    model = model_cls(config_cls(**args))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("random-ckpt")
    return {
        # grouped-query attention, rope_theta != 10000 and llama3 frequency scaling
        "llama-gqa-llama3": make_random_checkpoint(
            base / "llama",
            "llama",
            rope_theta=50000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "qwen2": make_random_checkpoint(base / "qwen2", "qwen2"),
        "mistral": make_random_checkpoint(base / "mistral", "mistral"),
        # a window shorter than the prompts, so attention is cut by it in prefill and decode
        "mistral-window": make_random_checkpoint(base / "mistral-window", "mistral", sliding_window=8),
        # dynamic NTK scaling, generating past max_position_embeddings
        "llama-dynamic": make_random_checkpoint(
            base / "dynamic",
            "llama",
            max_position_embeddings=48,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
        # biases on every projection (Llama's attention_bias includes o_proj), untied head
        "llama-bias": make_random_checkpoint(base / "bias", "llama", attention_bias=True, mlp_bias=True),
        "llama-tied": make_random_checkpoint(
            base / "tied", "llama", tie_word_embeddings=True, num_key_value_heads=4
        ),
    }
