"""Start and stop a local tritonserver (the 2.51 build unpacked by `make tritonserver`).

`TritonServer` is a context manager: it starts the server on 127.0.0.1 with the given (or free)
HTTP, gRPC and metrics ports, waits until it reports ready, and on exit stops it with SIGINT,
then SIGKILL, for its whole process group, so that no python-backend stub outlives it.

    python -m backends.launcher --model-repository DIR [--http-port 8000 --grpc-port 8001
        --metrics-port 8002] [--log-verbose N] [--log-file PATH]

runs it in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, NamedTuple

from backends.process_group import SHM_DIR, kv_segments, signal_group, stub_shm_regions, wait_group_gone
from backends.tritonserver_config import (
    DEFAULT_INSTALL_DIR,
    LOCALHOST,
    REPO_ROOT,
    TritonServerConfig,
    free_port,
    free_ports,
    missing_install,
    server_environment,
)

__all__ = [
    "DEFAULT_INSTALL_DIR",
    "REPO_ROOT",
    "TritonPorts",
    "TritonServer",
    "TritonServerConfig",
    "TritonServerError",
    "free_port",
    "main",
    "missing_install",
]


class TritonServerError(RuntimeError):
    """The server is not installed, did not become ready, or died."""


class TritonPorts(NamedTuple):
    """The ports a running server listens on."""

    http: int
    grpc: int
    metrics: int


class TritonServer:
    """A tritonserver process bound to 127.0.0.1, stopped (with its stubs) on exit."""

    def __init__(self, config: TritonServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._ports: TritonPorts | None = None
        # Stub shm regions seen while running: a stub killed mid-run (Triton 2.51 does not
        # restart it) leaves its region behind, so the names must be known before stop.
        self._shm_names: set[str] = set()
        self._temp_log = config.log_file is None
        self.log_path = Path(config.log_file) if config.log_file else self._make_temp_log()

    @staticmethod
    def _make_temp_log() -> Path:
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        return Path(name)

    # -- public interface ---------------------------------------------------------------------
    @property
    def ports(self) -> TritonPorts:
        if self._ports is None:
            raise TritonServerError("the server is not running")
        return self._ports

    @property
    def http_url(self) -> str:
        """Base URL for HTTP (tritonclient.http takes it without the scheme: `http_address`)."""
        return f"http://{LOCALHOST}:{self.ports.http}"

    @property
    def http_address(self) -> str:
        return f"{LOCALHOST}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc.InferenceServerClient(url=...) takes it."""
        return f"{LOCALHOST}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise TritonServerError("the server is not running")
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> TritonServer:
        """Start the server and wait until /v2/health/ready answers 200; raise TritonServerError if not."""
        if self._proc is not None:
            raise TritonServerError("the server is already started")
        problem = missing_install(self.config.install_dir)
        if problem:
            raise TritonServerError(problem)
        requested = (self.config.http_port, self.config.grpc_port, self.config.metrics_port)
        # Free ports are only reserved until we close the probe socket: retry a lost race.
        attempts = 3 if any(not p for p in requested) else 1
        for attempt in range(attempts):
            fresh = iter(free_ports(sum(not p for p in requested), taken=tuple(p for p in requested if p)))
            self._ports = TritonPorts(*(p if p else next(fresh) for p in requested))
            self._spawn()
            try:
                self._wait_ready()
                self._shm_names.update(stub_shm_regions(self.pid))
                atexit.register(self.stop)
                return self
            except TritonServerError:
                lost_race = "Address already in use" in self.log_tail(200)
                self._terminate()
                if not (lost_race and attempt + 1 < attempts):
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> int | None:
        """Stop the server (SIGINT, then SIGKILL after stop_timeout_s); return its exit code."""
        atexit.unregister(self.stop)
        code = self._terminate()
        if self._temp_log:
            self.log_path.unlink(missing_ok=True)
        return code

    def wait(self) -> int:
        """Block until the server exits by itself; return its exit code."""
        if self._proc is None:
            raise TritonServerError("the server is not running")
        return self._proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------
    def command(self) -> list[str]:
        cfg, ports = self.config, self.ports
        return [
            str(cfg.binary),
            f"--model-repository={Path(cfg.model_repository).resolve()}",
            f"--backend-directory={cfg.backend_dir}",
            "--model-control-mode=none",
            f"--http-address={LOCALHOST}",
            f"--grpc-address={LOCALHOST}",
            f"--metrics-address={LOCALHOST}",
            f"--http-port={ports.http}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
            f"--log-verbose={cfg.log_verbose}",
            # The server's own grace period stays below ours, so SIGKILL is the exception.
            f"--exit-timeout-secs={max(1, int(cfg.stop_timeout_s) - 5)}",
            *cfg.extra_args,
        ]

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Server log, stub stderr (Python tracebacks, crashes) and print() all land in one file.
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=server_environment(self.config),
            start_new_session=True,  # its own process group: the stubs are killed with it
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=1.0) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.1)
        raise TritonServerError(
            f"tritonserver was not ready after {self.config.startup_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _terminate(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        pgid = proc.pid  # the session leader's pid is its group id
        shm_names = self._shm_names | set(stub_shm_regions(pgid))
        self._shm_names = set()
        code = proc.poll()
        if code is None:
            signal_group(pgid, signal.SIGINT)
            try:
                code = proc.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                signal_group(pgid, signal.SIGKILL)
                code = proc.wait()
        # Stubs left behind by a crashed or killed server still hold shm; end them too.
        signal_group(pgid, signal.SIGKILL)
        wait_group_gone(pgid, timeout_s=5.0)
        for name in shm_names:
            (SHM_DIR / name).unlink(missing_ok=True)
        for segment in kv_segments(pgid):  # a prefill killed before its finalize left its pool
            segment.unlink(missing_ok=True)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run tritonserver on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--http-port", type=int, default=8000, help="0: a free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0: a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0: a free port")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", type=Path, default=Path("out/tritonserver.log"))
    parser.add_argument("--install-dir", type=Path, default=DEFAULT_INSTALL_DIR)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        config = TritonServerConfig(
            model_repository=args.model_repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            install_dir=args.install_dir,
            log_file=args.log_file,
            log_verbose=args.log_verbose,
            startup_timeout_s=args.startup_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(config)
    try:
        server.start()
        print(
            f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  "
            f"metrics {server.metrics_url}  log {server.log_path}  (Ctrl-C stops it)",
            flush=True,
        )
        code = server.wait()
        print(f"tritonserver exited with code {code}; log tail:\n{server.log_tail()}", file=sys.stderr)
        return code or 1
    except TritonServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short and orphan the server.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
