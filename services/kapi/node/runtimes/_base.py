"""The one small interface every runtime implements."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import numpy.typing as npt

from kapi.core._generated.inference import model_config_pb2 as mc

Arrays = dict[str, npt.NDArray[np.generic]]
Result = TypeVar("Result")


async def in_daemon_thread(call: Callable[[], Result]) -> Result:
    """`call()` on a thread of its own that does not hold up the process's exit: for work
    that a bounded wait may give up on (a runtime that does not stop), where the default
    executor would make the exit wait for it all the same."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Result] = loop.create_future()

    def settle(result: Result | None, error: BaseException | None) -> None:
        if future.done():  # the waiter gave up
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(Result, result))

    def run() -> None:
        result: Result | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="kapi-stop", daemon=True).start()
    return await future


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the runtime sees it: -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class ModelFiles:
    """Where one version of a model lives and how it is configured."""

    model_dir: Path
    version_dir: Path
    filename: str
    config: mc.ModelConfig
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.version_dir / self.filename


class Runtime(abc.ABC):
    """Loads one model version and runs it. Loading and unloading run off the event loop;
    `infer` blocks, and is called on the scheduler's instance threads (one per instance in
    the model's instance_group), so it may run on that many threads at once."""

    #: The file a version directory holds when config.pbtxt names no default_model_filename.
    default_filename: str = ""
    #: The config.pbtxt `parameters` keys this runtime reads; others are warned about at load.
    parameters: frozenset[str] = frozenset()
    #: Instances of a CPU instance group that gives no count (Triton's default per backend).
    cpu_instance_count: int = 1

    @classmethod
    def default_kind(cls) -> mc.ModelInstanceGroup.Kind.ValueType:
        """The instance kind of a group that names none (KIND_AUTO): where this runtime
        runs when nothing says otherwise."""
        return mc.ModelInstanceGroup.KIND_CPU

    @classmethod
    def gpu_ids(cls) -> list[int]:
        """The GPU device ids this runtime can run instances on ([] for a CPU runtime)."""
        return []

    def __init__(self, files: ModelFiles, instances: int) -> None:
        self.files = files
        self.instances = instances

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def prepare_input(self, name: str, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """One request's input converted to what the runtime takes. Runs before the request
        joins a batch, so an input the runtime cannot take fails its own request only."""
        return array

    async def unload(self) -> None:
        await in_daemon_thread(self._unload)

    @abc.abstractmethod
    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The model's inputs and outputs, read from the loaded model."""

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        """Run one (possibly batched) execution of inputs that went through prepare_input;
        returns the named outputs. Blocks: call it on an instance thread."""

    def _unload(self) -> None:
        """Release the model; most runtimes free everything when dropped."""
