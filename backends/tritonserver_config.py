"""Where `make tritonserver` installs the server, how to start it, and with which environment."""

from __future__ import annotations

import os
import socket
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from kv_transfer.memcpy_tuning import tuned_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INSTALL_DIR = REPO_ROOT / ".venv" / "triton"
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class TritonServerConfig:
    """How to start tritonserver.

    Ports that are None or 0 are chosen free at start (and chosen again if the server loses the
    race for one). `python_bin_dir` is put first on PATH: the python-backend stub runs the
    interpreter found there (default: the stub environment made by `make tritonserver`).
    `log_file` None means a temporary file, removed when the server stops.
    """

    model_repository: Path
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    install_dir: Path = DEFAULT_INSTALL_DIR
    python_bin_dir: Path | None = None
    log_file: Path | None = None
    log_verbose: int = 0
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not Path(self.model_repository).is_dir():
            raise ValueError(f"model repository {self.model_repository} is not a directory")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535 (0 or None: a free port), got {port}")
        if self.log_verbose < 0:
            raise ValueError(f"log_verbose must be >= 0, got {self.log_verbose}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be > 0")
        reserved = {"--model-repository", "--backend-directory", "--model-control-mode"}
        clash = [a for a in self.extra_args if a.split("=")[0] in reserved or "-address" in a or "-port" in a]
        if clash:
            raise ValueError(f"extra_args may not set what the launcher sets: {clash}")

    @property
    def server_dir(self) -> Path:
        return Path(self.install_dir) / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        return self.server_dir / "backends"

    @property
    def library_dir(self) -> Path:
        return Path(self.install_dir) / "nvidia_pytriton.libs"

    @property
    def stub_python_bin_dir(self) -> Path:
        return (
            Path(self.python_bin_dir) if self.python_bin_dir else Path(self.install_dir) / "stubenv" / "bin"
        )


def missing_install(install_dir: Path = DEFAULT_INSTALL_DIR) -> str | None:
    """A message naming what is missing from `install_dir`, or None if the install is complete."""
    probe = TritonServerConfig(model_repository=Path("/"), install_dir=install_dir)
    needed = [
        probe.binary,
        probe.backend_dir / "python" / "triton_python_backend_stub",
        probe.library_dir,
        probe.stub_python_bin_dir / "python3",
    ]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        return f"tritonserver is not installed ({', '.join(absent)} missing): run `make tritonserver`"
    return None


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port free on `host` right now (the kernel's choice for port 0)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOCALHOST, taken: tuple[int, ...] = ()) -> list[int]:
    """`count` different TCP ports free on `host` right now, none of them in `taken`: every probe
    socket stays bound until all are chosen, else the kernel may hand out one port twice (it did:
    tritonserver then refused HTTP and gRPC on the same port)."""
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports
    finally:
        for sock in socks:
            sock.close()


def server_environment(config: TritonServerConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver (and so every stub it spawns) runs with."""
    env = dict(os.environ if base is None else base)
    # The stub embeds the libpython3.X.so it finds first; take the one of this interpreter's build.
    libdirs = [str(config.library_dir), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*libdirs, env.get("LD_LIBRARY_PATH", "")] if p)
    # The embedded interpreter finds its prefix (and pyvenv.cfg) from `python3` on PATH.
    env["PATH"] = os.pathsep.join(p for p in [str(config.stub_python_bin_dir), env.get("PATH", "")] if p)
    for var in ("PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(var, None)
    return tuned_environment(env)  # the decode stubs copy KV blocks
