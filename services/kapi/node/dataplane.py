"""The node's data plane: everything the protocol servers do, free of transport types."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from kapi import __version__
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import FailedPrecondition, KapiError, Unavailable
from kapi.core.inference import InferenceRequest, InferenceResponse
from kapi.node.config import oip_datatype
from kapi.node.repository import IndexEntry, ModelRepository
from kapi.node.runtimes import TensorSpec
from kapi.node.stats import ModelStats

SERVER_NAME = "kapi"
# The OIP extensions kapi implements, in Triton's spelling.
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data")


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        explicit_model_control: bool,
        max_response_bytes: int = 0,
    ) -> None:
        self.repository = repository
        self.explicit_model_control = explicit_model_control
        self.max_response_bytes = max_response_bytes  # 0: no limit
        # Set when the node drains: open streams take no more requests and end.
        self.draining = asyncio.Event()
        self.live = True
        self.ready = False

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return SERVER_NAME, __version__, EXTENSIONS

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.repository.get(name, version)
        except KapiError:
            return False
        return True

    def model_metadata(
        self, name: str, version: str
    ) -> tuple[list[str], str, list[TensorSpec], list[TensorSpec]]:
        """Versions, platform, inputs and outputs (with the batch dimension as -1)."""
        model = self.repository.get(name, version)
        batch = [-1] if model.config.max_batch_size > 0 else []

        def specs(tensors: Iterable[mc.ModelInput | mc.ModelOutput]) -> list[TensorSpec]:
            return [
                TensorSpec(t.name, oip_datatype(t.data_type), (*batch, *t.dims)) for t in tensors
            ]

        versions = [str(v) for v in self.repository.ready_versions(name)]
        return versions, model.platform, specs(model.config.input), specs(model.config.output)

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        return self.repository.get(name, version).config

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if not self.ready:
            raise Unavailable("the server is not ready: starting up or draining")
        model = self.repository.get(request.model_name, request.model_version)
        return await model.infer(request, self.max_response_bytes)

    def statistics(self, name: str, version: str) -> list[tuple[str, str, ModelStats]]:
        models = [self.repository.get(name, version)] if name else self.repository.loaded()
        return [(m.name, str(m.version), m.stats) for m in models]

    def index(self, ready_only: bool) -> list[IndexEntry]:
        return self.repository.index(ready_only)

    async def load(self, name: str) -> None:
        self._check_model_control()
        await self.repository.load(name)

    async def unload(self, name: str) -> None:
        self._check_model_control()
        await self.repository.unload(name)

    def _check_model_control(self) -> None:
        if not self.explicit_model_control:
            raise FailedPrecondition(
                "explicit model load / unload is not allowed: start the node with "
                "--model-control-mode explicit"
            )
