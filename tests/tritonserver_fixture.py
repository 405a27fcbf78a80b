"""Pytest helpers to run tests against a real tritonserver on free ports.

    from tritonserver_fixture import tritonserver_fixture

    def write_repository(repo: Path) -> None:
        ...  # write <model>/config.pbtxt and <model>/1/model.py under repo

    server = tritonserver_fixture(write_repository, scope="module")

    def test_something(server: TritonServer) -> None:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

There is no skip: a missing tritonserver FAILS the test with the command that installs it
(`make tritonserver`; `make test` and CI always install it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from backends.launcher import DEFAULT_INSTALL_DIR, TritonServer, TritonServerConfig, missing_install

# A repository is either an existing folder or a function that writes one into the folder it is given.
RepositorySource = Path | Callable[[Path], None]


def require_tritonserver(install_dir: Path = DEFAULT_INSTALL_DIR) -> None:
    """Fail the calling test (not skip) when tritonserver is not installed."""
    problem = missing_install(install_dir)
    if problem:
        pytest.fail(problem, pytrace=False)


def start_tritonserver(repository: Path, workdir: Path, **config: Any) -> TritonServer:
    """Start a server for `repository` on free ports, its log in `workdir`; the caller stops it."""
    require_tritonserver(config.get("install_dir", DEFAULT_INSTALL_DIR))
    server = TritonServer(
        TritonServerConfig(model_repository=repository, log_file=workdir / "tritonserver.log", **config)
    )
    return server.start()


def tritonserver_fixture(
    repository: RepositorySource,
    *,
    scope: Literal["function", "module", "session"] = "module",
    **config: Any,
) -> Any:
    """A pytest fixture that yields a running TritonServer for `repository` and stops it afterwards.

    Assign the result to a module-level name (that name is the fixture's name). `config` is
    passed to TritonServerConfig (e.g. log_verbose=1, startup_timeout_s=60).
    """

    @pytest.fixture(scope=scope)
    def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
        workdir = tmp_path_factory.mktemp("tritonserver")
        if isinstance(repository, Path):
            repo = repository
        else:
            repo = workdir / "model_repository"
            repo.mkdir()
            repository(repo)
        server = start_tritonserver(repo, workdir, **config)
        try:
            yield server
        finally:
            server.stop()

    return _server
