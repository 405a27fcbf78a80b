from __future__ import annotations

from backends.tritonserver_config import TritonServerConfig, server_environment
from kv_transfer.memcpy_tuning import NON_TEMPORAL_THRESHOLD, tuned_environment


def test_tuning_is_added_once_and_an_explicit_threshold_wins() -> None:
    assert tuned_environment({})["GLIBC_TUNABLES"] == NON_TEMPORAL_THRESHOLD
    other = tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert other == "glibc.malloc.arena_max=2:" + NON_TEMPORAL_THRESHOLD
    mine = "glibc.cpu.x86_non_temporal_threshold=0x100000"
    assert tuned_environment({"GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"] == mine
    assert tuned_environment(tuned_environment({})) == tuned_environment({})


def test_tritonserver_runs_with_the_tuning(tmp_path: object) -> None:
    env = server_environment(TritonServerConfig(model_repository=tmp_path), base={"PATH": "/usr/bin"})  # type: ignore[arg-type]
    assert NON_TEMPORAL_THRESHOLD in env["GLIBC_TUNABLES"]
