"""Triton model repository writer: conventions, parseable configs, the committed default copy."""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from backends.common.params import EngineParams, OrchestratorParams, ParameterError
from backends.message import MODEL_INTERFACES
from planner import PlannerError
from planner.deployment import DECODE_CPU_NICE, Deployment, ReplicaSpec, default_deployment, replica_names
from planner.repository import main, write_repository

ROOT = Path(__file__).resolve().parents[1]


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_committed_default_repository_is_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model_repository/ is what `python -m planner.repository --out model_repository` writes."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model_repository"
    assert main(["--out", "model_repository"]) == 0
    committed = ROOT / "model_repository"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_dir())
    for name in names:
        for rel in ("config.pbtxt", "1/model.py"):
            assert filecmp.cmp(out / name / rel, committed / name / rel, shallow=False), f"{name}/{rel}"


def test_default_repository_follows_the_conventions(tmp_path: Path) -> None:
    write_repository(default_deployment("../models/tiny-llama"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "colocated", "decode", "ensemble", "orchestrator", "prefill", "tensorrt_llm_bls",
    ]  # fmt: skip
    for folder in tmp_path.iterdir():
        cfg = parse(folder / "config.pbtxt")
        entry_point = folder.name in ("ensemble", "tensorrt_llm_bls")  # TensorRT-LLM's names and shapes
        assert cfg.name == folder.name and cfg.backend == "python" and cfg.max_batch_size == int(entry_point)
        assert cfg.model_transaction_policy.decoupled
        role = "orchestrator" if entry_point else folder.name
        inputs, outputs = MODEL_INTERFACES[role]
        assert [(i.name, mc.DataType.Name(i.data_type), tuple(i.dims), i.optional) for i in cfg.input] == [
            (s.name, s.data_type, s.dims, s.optional) for s in inputs
        ]
        assert [o.name for o in cfg.output] == [s.name for s in outputs]
        (group,) = cfg.instance_group
        assert group.count == 1 and group.kind == mc.ModelInstanceGroup.KIND_CPU
        assert (
            f"from backends.{role}.model import TritonPythonModel" in (folder / "1" / "model.py").read_text()
        )
    orch = params(parse(tmp_path / "orchestrator" / "config.pbtxt"))
    assert orch["prefill_models"] == "prefill" and orch["decode_models"] == "decode"
    assert orch["input_in_output"] == "exclude"
    for name in ("ensemble", "tensorrt_llm_bls"):
        alias = params(parse(tmp_path / name / "config.pbtxt"))
        assert alias == {**orch, "input_in_output": "include"}  # the same replicas: no engine of its own
    eng = params(parse(tmp_path / "prefill" / "config.pbtxt"))
    assert (
        eng["model_dir"] == "../models/tiny-llama" and eng["device"] == "cpu" and eng["max_model_len"] == ""
    )
    for key in ("dtype", "block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs", "tp_size",
                "pp_size", "num_threads", "decode_attention", "kv_transport", "kv_lease_seconds",
                "device_ids", "cpu_nice"):  # fmt: skip
        assert key in eng
    # On CPU decode runs at a lower priority than the phases and the server it shares the cores with.
    nice = {
        m: params(parse(tmp_path / m / "config.pbtxt"))["cpu_nice"]
        for m in ("prefill", "decode", "colocated")
    }
    assert nice == {"prefill": "0", "decode": str(DECODE_CPU_NICE), "colocated": "0"} and DECODE_CPU_NICE > 0


def test_gpu_instance_groups_and_stale_models(tmp_path: Path) -> None:
    def rep(name: str, role: str, ids: tuple[int, ...], tp: int) -> ReplicaSpec:
        return ReplicaSpec(
            name, role, EngineParams("/m", "cuda", "float16", tp_size=tp, kv_transport="nccl", device_ids=ids)
        )

    dep = Deployment(
        prefill=(rep("prefill_0", "prefill", (0,), 1), rep("prefill_1", "prefill", (1,), 1)),
        decode=(rep("decode", "decode", (2, 3), 2),),
        orchestrator=OrchestratorParams("/m"),
        tensorrt_llm_entry_points=(),
    )
    (tmp_path / "colocated").mkdir()
    (tmp_path / "colocated" / "config.pbtxt").write_text('name: "colocated"')
    (tmp_path / "notes").mkdir()  # not a model folder: left alone
    assert write_repository(dep, tmp_path) == ["decode", "orchestrator", "prefill_0", "prefill_1"]
    assert not (tmp_path / "colocated").exists() and (tmp_path / "notes").is_dir()
    g = parse(tmp_path / "prefill_1" / "config.pbtxt").instance_group[0]
    assert g.kind == mc.ModelInstanceGroup.KIND_GPU and list(g.gpus) == [1]
    d = parse(tmp_path / "decode" / "config.pbtxt")
    assert d.instance_group[0].kind == mc.ModelInstanceGroup.KIND_MODEL
    assert params(d)["device_ids"] == "2,3" and params(d)["tp_size"] == "2"
    assert params(d)["cpu_nice"] == "0"
    assert (
        params(parse(tmp_path / "orchestrator" / "config.pbtxt"))["prefill_models"] == "prefill_0,prefill_1"
    )


def test_deployment_validation() -> None:
    assert replica_names("decode", 1) == ["decode"] and replica_names("decode", 2) == ["decode_0", "decode_1"]
    with pytest.raises(ParameterError, match="device must be"):
        EngineParams("/m", device="tpu")
    with pytest.raises(ParameterError, match="cpu_nice must be <= 19, got 20"):
        EngineParams("/m", cpu_nice=20)
    with pytest.raises(ParameterError, match="cpu_nice must be >= 0, got -1"):
        EngineParams.from_parameters({"model_dir": "/m", "cpu_nice": "-1"})
    with pytest.raises(ParameterError, match="num_blocks"):
        EngineParams("/m", num_blocks=0)
    with pytest.raises(ParameterError, match="needs device ids"):
        ReplicaSpec("prefill", "prefill", EngineParams("/m", "cuda"))
    cpu = EngineParams("/m")
    with pytest.raises(PlannerError, match="must be named"):
        Deployment((ReplicaSpec("prefill_0", "prefill", cpu),), (ReplicaSpec("decode", "decode", cpu),),
                   OrchestratorParams("/m"))  # fmt: skip


def test_the_orchestrators_context_is_the_smallest_of_its_engines(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """max_context_tokens: the least KV pool or max_model_len of the routed engines; with the
    checkpoint's own context (2048 for the tiny model) it bounds every request to the entry point."""
    from backends.common.params import request_context_tokens

    dep = default_deployment(str(tiny_model_dir), num_blocks=100)  # 1600 tokens per pool
    small = dataclasses.replace(
        dep.decode[0], engine=dataclasses.replace(dep.decode[0].engine, max_model_len=900)
    )
    dep = dataclasses.replace(dep, decode=(small,))
    write_repository(dep, tmp_path)
    for name, expected in (("orchestrator", 900), ("ensemble", 900), ("colocated", 1600)):
        raw = params(text_format.Parse((tmp_path / name / "config.pbtxt").read_text(), mc.ModelConfig()))
        assert request_context_tokens(raw, tiny_model_dir) == expected, name
    raw = {
        **params(text_format.Parse((tmp_path / "colocated" / "config.pbtxt").read_text(), mc.ModelConfig()))
    }
    raw["num_blocks"] = "1000"  # a pool larger than the checkpoint's context
    assert request_context_tokens(raw, tiny_model_dir) == 2048
