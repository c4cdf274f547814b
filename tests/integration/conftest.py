"""The integration suite's shared node: one repository with every model the tests need,
served by one `kapi node` for the whole session, and clients connected to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc

from tests.support.node import RunningNode, running_node
from tests.support.repositories import MainRepository, build_main_repository


@pytest.fixture(scope="session")
def main_repository(tmp_path_factory: pytest.TempPathFactory) -> MainRepository:
    root = tmp_path_factory.mktemp("repository")
    return MainRepository(root, build_main_repository(root))


@pytest.fixture(scope="session")
def main_node(main_repository: MainRepository, node_logs: Path) -> Iterator[RunningNode]:
    """The node every test shares: default model control, every model of the repository."""
    with running_node(main_repository.path, node_logs) as node:
        yield node


@pytest.fixture(scope="session")
def client(main_node: RunningNode) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(main_node.grpc_url) as triton:
        yield triton


@pytest.fixture(scope="session")
def channel(main_node: RunningNode) -> Iterator[grpc.Channel]:
    # Like tritonclient's: responses may be as large as the node's limit, not gRPC's 4 MiB.
    options = [("grpc.max_receive_message_length", 2**31 - 1)]
    with grpc.insecure_channel(main_node.grpc_url, options=options) as opened:
        yield opened


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    """The raw OIP stub, for requests tritonclient will not build (typed contents, bad raw)."""
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)
