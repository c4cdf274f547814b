"""Fixtures shared by every test suite: loopback ports and where node processes log."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.node import NodeFactory, RunningNode, WaitFor, free_port, start_node


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
        repository: Path,
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
