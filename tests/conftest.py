"""Fixtures shared by every test suite: loopback ports, where node processes log, a
PostgreSQL server with a fresh database per test, and real NVIDIA Triton servers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.node import NodeFactory, RunningNode, WaitFor, free_port, start_node
from tests.support.postgres import (
    PostgresUnavailable,
    drop_database,
    fresh_database,
    running_postgres,
)
from tests.support.registry import RunningRepository, start_repository
from tests.support.triton import (
    RunningTriton,
    TritonFactory,
    TritonModel,
    start_triton,
    triton_unavailable,
)

# Set (by CI, where PostgreSQL is installed) to fail, not skip, when it cannot start.
REQUIRE_POSTGRES_ENV = "KAPI_TEST_REQUIRE_POSTGRES"
# Set (by CI, where bench/tritonpeer/setup.sh installed Triton) to fail, not skip, without it.
REQUIRE_TRITON_ENV = "KAPI_TEST_REQUIRE_TRITON"


@pytest.fixture
def unused_port() -> Callable[[], int]:
    """A function that returns a loopback port nothing listens on."""
    return free_port


@pytest.fixture(scope="session")
def node_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every `kapi node` started by the tests writes its log."""
    return tmp_path_factory.mktemp("node-logs")


@pytest.fixture
def start_kapi_node(node_logs: Path) -> Iterator[NodeFactory]:
    """Starts `kapi node` processes for one test and stops every one at its end."""
    nodes: list[RunningNode] = []

    def start(
        repository: Path | None,
        *,
        explicit: bool = False,
        load_models: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        wait_for: WaitFor = "ready",
    ) -> RunningNode:
        node = start_node(
            repository,
            node_logs,
            explicit=explicit,
            load_models=load_models,
            env=env,
            args=args,
            wait_for=wait_for,
        )
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.terminate()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a PostgreSQL server for the session: a throwaway cluster, or the one
    KAPI_TEST_POSTGRES_URL names. The tests that use it skip when there is none."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(running_postgres(tmp_path_factory.mktemp("postgres")))
        except PostgresUnavailable as error:
            if os.environ.get(REQUIRE_POSTGRES_ENV):
                raise
            pytest.skip(f"no PostgreSQL: {error}")
        yield url


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty database for one test, dropped at its end."""
    url = fresh_database(postgres_url)
    yield url
    drop_database(postgres_url, url)


class RepositoryFactory(Protocol):
    def __call__(self, data: Path, **kwargs: Any) -> RunningRepository: ...


@pytest.fixture
def start_kapi_repository(node_logs: Path) -> Iterator[RepositoryFactory]:
    """Starts `kapi repository serve` processes for one test and stops every one at its end
    (keyword arguments as tests.support.registry.start_repository takes them)."""
    started: list[RunningRepository] = []

    def start(data: Path, **kwargs: Any) -> RunningRepository:
        repository = start_repository(data, node_logs, **kwargs)
        started.append(repository)
        return repository

    yield start
    for repository in started:
        repository.terminate()


def require_triton() -> None:
    """Skip without Triton, or fail where KAPI_TEST_REQUIRE_TRITON is set."""
    if (reason := triton_unavailable()) is not None:
        if os.environ.get(REQUIRE_TRITON_ENV):
            pytest.fail(f"{REQUIRE_TRITON_ENV} is set, but {reason}", pytrace=False)
        pytest.skip(f"no Triton: {reason}")


@pytest.fixture(name="start_triton")
def start_triton_fixture(
    node_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonFactory]:
    """Starts real tritonserver processes (NVIDIA Triton 2.51, CPU, python backend running
    ONNX Runtime) for one test and stops every one at its end: `start_triton({name: (onnx,
    config)}, args=[...])`, as tests.support.triton.start_triton takes them. Skips when Triton
    is not installed (bench/tritonpeer/setup.sh), or fails where KAPI_TEST_REQUIRE_TRITON is
    set."""
    require_triton()
    servers: list[RunningTriton] = []

    def start(models: Mapping[str, TritonModel], *, args: Sequence[str] = ()) -> RunningTriton:
        workdir = tmp_path_factory.mktemp("triton")
        server = start_triton(models, workdir, node_logs, args=args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.terminate()
