"""The node's data plane: everything the protocol servers do, free of transport types.

It counts the inference requests in flight, so that a drain can wait for exactly those:
once draining, new requests are refused with UNAVAILABLE while the ones already inside
finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Mapping

from kapi import __version__
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import FailedPrecondition, InvalidArgument, KapiError, Unavailable
from kapi.core.inference import InferenceRequest, InferenceResponse, Parameter, RequestLimits
from kapi.node.config import oip_datatype
from kapi.node.parameters import check_unload_parameters, load_override
from kapi.node.repository import IndexEntry, ModelRepository
from kapi.node.runtimes import TensorSpec
from kapi.node.shared_memory import SharedMemoryManager
from kapi.node.stats import ModelStats

SERVER_NAME = "kapi"
# The OIP extensions kapi implements, in Triton's spelling.
EXTENSIONS = (
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "system_shared_memory",
)


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        explicit_model_control: bool,
        max_response_bytes: int = 0,
        strict_readiness: bool = True,
    ) -> None:
        # The hardware profiles the node runs, best first, in ServerMetadata's extensions
        # as "kapi-profile:<profile>", and its REST port as "kapi-http-port:<port>": how a
        # gateway learns them over the protocol itself.
        self.profile_extensions: tuple[str, ...] = ()
        self.repository = repository
        self.explicit_model_control = explicit_model_control
        self.max_response_bytes = max_response_bytes  # 0: no limit
        self.strict_readiness = strict_readiness
        # Set when the node drains: requests are refused, open streams read no more.
        self.draining = asyncio.Event()
        self.serving = False  # set once the models to load at start have loaded or failed
        self._in_flight = 0
        self._last_arrival = 0.0  # event-loop time of the last inference request
        self._idle = asyncio.Event()
        self._idle.set()
        self._control: set[asyncio.Future[None]] = set()  # loads and unloads under way
        self.shared_memory = SharedMemoryManager()

    @property
    def ready(self) -> bool:
        """Serving and not draining; with strict readiness (Triton's default), also every
        model it was asked to load is loaded."""
        if not self.serving or self.draining.is_set():
            return False
        return not self.strict_readiness or self.repository.all_ready()

    async def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until no inference request is in flight and none has arrived for `quiet_s`
        (so the clients have heard UNAVAILABLE and gone elsewhere); False if `timeout_s`
        came first. Stopping the server while requests still arrive would cancel those
        gRPC had accepted and no handler had run yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                return False
            silent = loop.time() - self._last_arrival
            if silent >= quiet_s:
                return True
            await asyncio.sleep(min(quiet_s - silent, max(deadline - loop.time(), 0)))
        return False

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return SERVER_NAME, __version__, EXTENSIONS + self.profile_extensions

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.repository.get(name, version)
        except InvalidArgument:
            raise  # a version string that names no version at all, as Triton answers it
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

    def request_limits(self, name: str, version: str) -> RequestLimits:
        """What a request to this model may carry; the model is looked up before a request
        to it is converted."""
        return self.repository.get(name, version).validator.limits

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        return self.repository.get(name, version).config

    def admit(self) -> None:
        """Count one inference request in; UNAVAILABLE while starting up or draining. Every
        admit is matched by one `release`."""
        self._last_arrival = asyncio.get_running_loop().time()
        if not self.serving or self.draining.is_set():
            raise Unavailable("the server is not ready: starting up or draining")
        self._in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def infer(self, request: InferenceRequest, admitted: bool = False) -> InferenceResponse:
        """Run one request; `admitted`: the caller has counted it in (and releases it), as a
        stream does for the requests it reads before a drain begins."""
        if not admitted:
            self.admit()
        try:
            model = self.repository.get(request.model_name, request.model_version)
            with self.shared_memory.attach(request) as held:
                response = await model.infer(request, self.max_response_bytes, set(held.outputs))
                if held.outputs:
                    written = self.shared_memory.write_outputs(response.outputs, held)
                    response.shared_memory = written
            return response
        finally:
            if not admitted:
                self.release()

    def statistics(self, name: str, version: str) -> list[tuple[str, str, ModelStats]]:
        """Every loaded version's statistics; of one model when named; of one version when
        that is named too (Triton's statistics extension)."""
        if name and version:
            models = [self.repository.get(name, version)]
        elif name:
            self.repository.get(name)  # unknown or without versions: its error
            models = [m for m in self.repository.loaded() if m.name == name]
        else:
            models = self.repository.loaded()
        return [(m.name, str(m.version), m.stats) for m in models]

    def index(self, ready_only: bool) -> list[IndexEntry]:
        return self.repository.index(ready_only)

    async def load(self, name: str, parameters: Mapping[str, Parameter | bytes]) -> None:
        self._check_model_control()
        await self._to_the_end(self.repository.load(name, load_override(parameters)))

    async def unload(self, name: str, parameters: Mapping[str, Parameter | bytes]) -> None:
        self._check_model_control()
        if check_unload_parameters(name, parameters):
            await self._to_the_end(self.repository.unload_with_dependents(name))
        else:
            await self._to_the_end(self.repository.unload(name))

    async def _to_the_end(self, operation: Coroutine[object, object, None]) -> None:
        """A load or unload runs to its end even if its caller gives up (a client deadline
        cancels the RPC), as in Triton: cut short, it would leave the model half loaded or
        half unloaded."""
        task = asyncio.ensure_future(operation)
        self._control.add(task)
        task.add_done_callback(_forget(self._control))
        await asyncio.shield(task)

    def _check_model_control(self) -> None:
        if not self.explicit_model_control:
            raise FailedPrecondition(
                "explicit model load / unload is not allowed: start the node with "
                "--model-control-mode explicit"
            )


def _forget(running: set[asyncio.Future[None]]) -> Callable[[asyncio.Future[None]], None]:
    """Drop a finished operation; its error, if its caller gave up, was logged by it."""

    def done(task: asyncio.Future[None]) -> None:
        running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the repository logged why a load failed

    return done
