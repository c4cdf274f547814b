"""How each contender is called: an ONNX Runtime session in this process, or a served model
through one of tritonclient's clients: gRPC (the same client for kapi, Triton and MLServer),
REST with binary tensors, or gRPC with the tensors in system shared memory."""

from __future__ import annotations

import abc
import functools
import itertools
import os
from typing import Any

import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from nodebench.load import Call
from nodebench.models import Array, Feed, ModelSpec, TensorSpec
from nodebench.servers import ServingSettings

_REGIONS = itertools.count()  # shared memory region names unique within this process


def session(spec: ModelSpec, settings: ServingSettings) -> ort.InferenceSession:
    """The session the in-process contender calls: the servers' thread settings."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    return ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])


class Target(abc.ABC):
    """What the load threads call: `make_call` once per thread, `release` after the round."""

    @abc.abstractmethod
    def make_call(self) -> Call: ...

    def release(self) -> None:
        """Free what the round's calls held."""


class InProcessTarget(Target):
    """One session shared by every thread, as ONNX Runtime allows: concurrent runs."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec) -> None:
        self.session = session
        self.spec = spec

    def make_call(self) -> Call:
        return functools.partial(self.session.run, self.spec.output_names, self.spec.sample())


class Client(abc.ABC):
    """One caller's connection to a served model, with the request it sends every time."""

    @abc.abstractmethod
    def infer(self) -> list[Array]:
        """Send the request; the outputs, in the model's order."""

    @abc.abstractmethod
    def close(self) -> None: ...


class ServedTarget(Target):
    """One served model; every `make_call` opens its own client (its own connection)."""

    def __init__(self, url: str, served_name: str, spec: ModelSpec) -> None:
        self.url = url
        self.served_name = served_name
        self.spec = spec
        self._clients: list[Client] = []

    @abc.abstractmethod
    def connect(self, feed: Feed) -> Client: ...

    def make_call(self) -> Call:
        client = self.connect(self.spec.sample())
        self._clients.append(client)
        return client.infer

    def infer_once(self, feed: Feed) -> list[Array]:
        client = self.connect(feed)
        try:
            return client.infer()
        finally:
            client.close()

    def release(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


class GrpcTarget(ServedTarget):
    """OIP gRPC through tritonclient.grpc, the tensors in the request and the response."""

    def connect(self, feed: Feed) -> Client:
        return _TritonClient(self, feed, grpcclient)


class HttpTarget(ServedTarget):
    """KServe v2 REST through tritonclient.http, with binary tensors (its default)."""

    def connect(self, feed: Feed) -> Client:
        return _TritonClient(self, feed, httpclient)


class SharedMemoryTarget(ServedTarget):
    """gRPC with every input and output in a system shared memory region of the client's."""

    def connect(self, feed: Feed) -> Client:
        return _SharedMemoryClient(self, feed)


class _TritonClient(Client):
    """tritonclient over gRPC or HTTP (`module`): the two take the same calls, and HTTP
    sends and receives binary tensors by default."""

    def __init__(self, target: ServedTarget, feed: Feed, module: Any) -> None:
        self._client = module.InferenceServerClient(target.url)
        self._name = target.served_name
        self._output_names = target.spec.output_names
        self._inputs = []
        for tensor in target.spec.inputs:
            request = module.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
            request.set_data_from_numpy(feed[tensor.name])
            self._inputs.append(request)
        self._outputs = [module.InferRequestedOutput(n) for n in self._output_names]

    def infer(self) -> list[Array]:
        result = self._client.infer(self._name, self._inputs, outputs=self._outputs)
        return [result.as_numpy(name) for name in self._output_names]

    def close(self) -> None:
        self._client.close()


class _SharedMemoryClient(Client):
    """Registers one region per input and per output once; then every request copies the
    inputs into their regions and the outputs out of theirs, as a caller that keeps its
    tensors elsewhere would. `close` unregisters and removes the regions."""

    def __init__(self, target: ServedTarget, feed: Feed) -> None:
        self._client = grpcclient.InferenceServerClient(target.url)
        self._name = target.served_name
        self._regions: list[tuple[str, shm.SharedMemoryRegion]] = []
        self._inputs: list[grpcclient.InferInput] = []
        self._feed: list[tuple[shm.SharedMemoryRegion, Array]] = []
        for tensor in target.spec.inputs:
            name, region = self._region(tensor.nbytes)
            request = grpcclient.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
            request.set_shared_memory(name, tensor.nbytes)
            self._inputs.append(request)
            self._feed.append((region, feed[tensor.name]))
        self._outputs: list[grpcclient.InferRequestedOutput] = []
        self._results: list[tuple[shm.SharedMemoryRegion, TensorSpec]] = []
        for tensor in target.spec.outputs:
            name, region = self._region(tensor.nbytes)
            output = grpcclient.InferRequestedOutput(tensor.name)
            output.set_shared_memory(name, tensor.nbytes)
            self._outputs.append(output)
            self._results.append((region, tensor))

    def _region(self, size: int) -> tuple[str, shm.SharedMemoryRegion]:
        name = f"kapi-bench-{os.getpid()}-{next(_REGIONS)}"
        region = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
        self._regions.append((name, region))
        self._client.register_system_shared_memory(name, f"/{name}", size)
        return name, region

    def infer(self) -> list[Array]:
        for region, array in self._feed:
            shm.set_shared_memory_region(region, [array])
        self._client.infer(self._name, self._inputs, outputs=self._outputs)
        # A copy: a view would pin the mapping, which `close` unmaps.
        return [
            shm.get_contents_as_numpy(region, tensor.dtype, tensor.shape).copy()
            for region, tensor in self._results
        ]

    def close(self) -> None:
        for name, region in self._regions:
            self._client.unregister_system_shared_memory(name)
            shm.destroy_shared_memory_region(region)
        self._regions.clear()
        self._client.close()
