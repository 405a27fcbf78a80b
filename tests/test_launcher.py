"""The launcher starts a real tritonserver on free loopback ports, serves a python model, stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonserver_fixture import require_tritonserver, start_tritonserver, tritonserver_fixture

from backends.launcher import REPO_ROOT, TritonServer, TritonServerConfig, TritonServerError, missing_install

MODEL_CONFIG = """
name: "double"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_INT32 dims: [ -1 ] },
        { name: "S" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_INT32 dims: [ -1 ] },
         { name: "S_OUT" data_type: TYPE_STRING dims: [ -1 ] },
         { name: "ENV" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

MODEL_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils

import backends


class TritonPythonModel:
    def execute(self, requests):
        env = f"{np.__version__} {backends.__file__}".encode()
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            s = pb_utils.get_input_tensor_by_name(request, "S").as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", (x * 2).astype(np.int32)),
                pb_utils.Tensor("S_OUT", np.array([v[::-1] for v in s], dtype=np.object_)),
                pb_utils.Tensor("ENV", np.array([env], dtype=np.object_)),
            ]))
        return responses
"""


def write_model(repo: Path, name: str, config: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


def write_double_repository(repo: Path) -> None:
    write_model(repo, "double", MODEL_CONFIG, MODEL_PY)


server = tritonserver_fixture(write_double_repository, scope="module")


def listening_inodes(pid: int) -> set[int]:
    """Socket inodes open in process `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listen_addresses(inodes: set[int]) -> list[tuple[str, int]]:
    """(hex local address, port) of every LISTEN socket among `inodes`, IPv4 and IPv6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            addr, port = cols[1].split(":")
            if cols[3] == "0A" and int(cols[9]) in inodes:  # 0A: TCP_LISTEN
                found.append((addr, int(port, 16)))
    return found


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.mark.e2e
def test_ready_infer_and_loopback_only(server: TritonServer) -> None:
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert grpc.is_model_ready("double")

    x = np.array([1, 2, 3, -7], dtype=np.int32)
    s = np.array([b"abc", b"de"], dtype=np.object_)
    inputs = [grpcclient.InferInput("X", [4], "INT32"), grpcclient.InferInput("S", [2], "BYTES")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(s)
    result = grpc.infer("double", inputs)
    # Exact values: the 2.51 stub corrupts tensor data when its interpreter has numpy 2.
    np.testing.assert_array_equal(result.as_numpy("Y"), x * 2)
    assert result.as_numpy("S_OUT").tolist() == [b"cba", b"ed"]
    numpy_version, backends_file = result.as_numpy("ENV")[0].decode().split(" ", 1)
    assert numpy_version.startswith("1."), numpy_version
    assert Path(backends_file).is_relative_to(REPO_ROOT)  # the project's own code is importable

    http = httpclient.InferenceServerClient(server.http_address)
    assert http.is_model_ready("double")
    assert "nv_inference_request_success" in _get(server.metrics_url)

    ports = set(server.ports)
    addresses = listen_addresses(listening_inodes(server.pid))
    assert ports <= {port for _, port in addresses}, (ports, addresses)
    assert all(addr in LOOPBACK_HEX for addr, _ in addresses), addresses


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.mark.e2e
def test_stop_ends_group_and_frees_ports(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_double_repository(repo)
    srv = start_tritonserver(repo, tmp_path)
    pid, ports = srv.pid, srv.ports
    stubs = [
        p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pid and p.name != str(pid)
    ]
    assert stubs, "the python model's stub should run in the server's process group"
    assert srv.stop() == 0  # SIGINT: a graceful exit
    assert not srv.is_running()
    assert not any(_pgid(p) == pid for p in Path("/proc").iterdir() if p.name.isdigit())
    for port in ports:  # every port can be bound again
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
    assert "successfully unloaded 'double'" in (tmp_path / "tritonserver.log").read_text()


def _pgid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.e2e
def test_failing_model_reports_log_tail(tmp_path: Path) -> None:
    require_tritonserver()
    repo = tmp_path / "repo"
    broken = "class TritonPythonModel:\n    def initialize(self, args):\n        raise ValueError('no weights in /nowhere')\n"
    write_model(repo, "broken", MODEL_CONFIG.replace('"double"', '"broken"'), broken)
    srv = TritonServer(
        TritonServerConfig(model_repository=repo, log_file=tmp_path / "log", startup_timeout_s=60)
    )
    with pytest.raises(TritonServerError, match="no weights in /nowhere"):
        srv.start()
    assert not srv.is_running()


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        TritonServerConfig(model_repository=tmp_path / "absent")
    with pytest.raises(ValueError, match="http_port"):
        TritonServerConfig(model_repository=tmp_path, http_port=70000)
    with pytest.raises(ValueError, match="may not set"):
        TritonServerConfig(model_repository=tmp_path, extra_args=("--http-address=0.0.0.0",))


def test_missing_install_fails_with_instruction(tmp_path: Path) -> None:
    assert "make tritonserver" in (missing_install(tmp_path) or "")
    with pytest.raises(TritonServerError, match="make tritonserver"):
        TritonServer(TritonServerConfig(model_repository=tmp_path, install_dir=tmp_path)).start()
    with pytest.raises(pytest.fail.Exception, match="make tritonserver"):
        require_tritonserver(tmp_path)


@pytest.mark.e2e
def test_killed_stub_leaves_no_shm_region(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_double_repository(repo)
    srv = start_tritonserver(repo, tmp_path)
    stub = next(
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _pgid(p) == srv.pid and p.name != str(srv.pid)
    )
    region = next(a.decode() for a in (stub / "cmdline").read_bytes().split(b"\0") if b"shm_region" in a)
    assert (Path("/dev/shm") / region).exists()
    os.kill(int(stub.name), signal.SIGKILL)  # Triton 2.51 does not restart it
    # A graceful server exit would unlink the region itself; a crashed server does not.
    os.kill(srv.pid, signal.SIGKILL)
    srv.stop()
    assert not (Path("/dev/shm") / region).exists()


def test_free_ports_are_different_and_avoid_the_taken_ones() -> None:
    """Probe sockets stay bound until every port is chosen: one port for HTTP and gRPC once made
    tritonserver refuse to start."""
    from backends.tritonserver_config import free_ports

    for _ in range(50):
        first = free_ports(3)
        assert len(set(first)) == 3
        assert not set(free_ports(2, taken=tuple(first))) & set(first)
