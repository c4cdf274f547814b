"""Data-parallel training under torchrun: which process this is, the process group, and the
few collectives training needs.

torchrun starts one process per rank and tells each its place through the environment
(WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE). A `World` of size 1 is a plain process: its
collectives do nothing and its shares are the whole, so a single process trains exactly as
it would without this module. `relaunch` is `kapi train --nproc N`: the same command again,
under torchrun, which this process becomes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import nn

from kapi.core.errors import FailedPrecondition, InvalidArgument

# The process group's backend for each kind of training device.
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}

Gathered = TypeVar("Gathered")


class TorchrunEnvironment(BaseSettings):
    """What torchrun sets for each process it starts (none of it outside torchrun)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1


@dataclass(frozen=True)
class World:
    """The processes training together, seen from one of them."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1  # the processes on this machine, which share its cores

    @classmethod
    def from_environment(cls) -> World:
        env = TorchrunEnvironment()
        if env.world_size == 1:  # a stray RANK (some schedulers set one) makes no rank 1
            return cls()
        return cls(env.world_size, env.rank, env.local_rank, env.local_world_size)

    @classmethod
    def on_this_machine(cls, processes: int) -> World:
        """What `processes` processes started here make, seen from rank 0."""
        if processes < 1:
            raise InvalidArgument(f"cannot train in {processes} processes; give 1 or more")
        return cls(size=processes, local_size=processes)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, checkpoints and writes the bundle."""
        return self.rank == 0

    def threads(self, requested: int | None) -> int:
        """torch's intra-op threads: as asked, else this machine's cores shared out."""
        return requested or max(1, (os.cpu_count() or 1) // self.local_size)

    def check_batch_size(self, batch_size: int) -> None:
        """A global batch splits evenly among the ranks (InvalidArgument where it does not)."""
        if batch_size % self.size:
            raise InvalidArgument(
                f"batch_size {batch_size} does not split evenly among {self.size} processes: "
                f"it is the global batch, so give a multiple of {self.size}"
            )

    def seed(self, seed: int) -> int:
        """A seed of this rank's own, derived from the run's (the run's own in one process)."""
        return seed * self.size + self.rank

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: cuda:LOCAL_RANK for CUDA in a distributed run."""
        if self.size == 1 or device.type != "cuda":
            return device
        if device.index is not None:
            raise InvalidArgument(
                f"device {device} names one GPU, but each of the {self.size} processes takes "
                "its own (cuda:LOCAL_RANK); give cuda or auto"
            )
        return torch.device("cuda", self.local_rank)

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of `batch` (parts differ in size by one at most)."""
        return batch if self.size == 1 else batch.tensor_split(self.size)[self.rank]

    def reseed(self, seed: int) -> None:
        """Each rank its own torch random stream (dropout masks) from here on; one process
        keeps the stream it has."""
        if self.size > 1:
            torch.manual_seed(self.seed(seed))

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` in DistributedDataParallel (gradients averaged over the ranks)."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def sum(self, *values: torch.Tensor) -> None:
        """Each tensor, in place, summed over the ranks: every rank gets the same sums."""
        if self.size > 1:
            for value in values:
                dist.all_reduce(value)

    def align_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch norm's running statistics) on every rank: each rank's last
        step updated its own, and evaluation and the best state must be the same everywhere."""
        if self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def gather(self, value: Gathered) -> list[Gathered]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values


SINGLE_PROCESS = World()


@contextmanager
def joined(world: World, device: torch.device) -> Iterator[None]:
    """The process group for the body, destroyed when it ends (also on an error)."""
    if world.size == 1:
        yield
        return
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise InvalidArgument(
            f"distributed training runs on {sorted(BACKENDS)} devices, not {device.type}"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as exc:  # WORLD_SIZE set, but not by torchrun, say
        raise FailedPrecondition(
            f"rank {world.rank} of {world.size} cannot join the {backend} process group: {exc}"
        ) from exc
    try:
        yield
    finally:
        dist.destroy_process_group()


def relaunch(nproc: int, command: str, options: Mapping[str, Any], threads: int) -> NoReturn:
    """This process becomes torchrun (exec), running `kapi COMMAND` in `nproc` processes on
    this machine with `options` (argparse's, by dest) as flags again. Being torchrun, not its
    parent, a signal to it (a cancelled job's SIGTERM) stops the processes it started, and
    its exit status is the command's."""
    # Not `in (None, False)`: 0 == False, and --lr 0 must travel.
    flags = [
        _flag(name, value)
        for name, value in options.items()
        if value is not None and value is not False
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", str(nproc), "-m", "kapi.cli", command]
    # torchrun would set 1 (and warn); training sets its own count from the same rule.
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [*launcher, *flags], environment)


def _flag(name: str, value: Any) -> str:
    option = "--" + name.replace("_", "-")
    return option if value is True else f"{option}={value}"
