"""Start a real NVIDIA Triton Inference Server 2.51 (CPU, python backend running ONNX Runtime)
on loopback ports and wait until it is ready: a peer for tests that run Triton beside kapi.

Triton lives in a venv of its own, made by `bash bench/tritonpeer/setup.sh` (CI runs it; the
venv is `$KAPI_TRITON_VENV`, default /opt/kapi-triton/venv). The repository layout and the
command line are bench/tritonpeer/repository.py's, shared with the benchmark.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.tritonpeer import repository as tritonpeer
from tests.support.node import STOP_TIMEOUT_S, ServerProcess, free_port, terminate

VENV_ENV = "KAPI_TRITON_VENV"
DEFAULT_VENV = Path("/opt/kapi-triton/venv")
SETUP = Path(tritonpeer.__file__).with_name("setup.sh")
# Written by setup.sh once the venv's requirements are installed.
MARKER = ".kapi-triton-requirements"
READY_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 6000
# What Triton logs when a port picked as free was taken before it bound it (gRPC, HTTP and
# metrics alike: "failed to start HTTP service: Unavailable - Socket '…' already in use").
_PORT_TAKEN = ("already in use",)

# A model for Triton: its ONNX file (a path, or the serialized model), and the config text past
# `name` and `backend` (inputs, outputs, max_batch_size, dynamic_batching, instance_group,
# parameters), as bench/tritonpeer/repository.py's write_python_repository takes them.
TritonModel = tuple[Path | bytes, str]


class TritonFactory(Protocol):
    """Starts a ready Triton on these models (what the `start_triton` fixture gives)."""

    def __call__(
        self, models: Mapping[str, TritonModel], *, args: Sequence[str] = ()
    ) -> RunningTriton: ...


class TritonFailedToStart(RuntimeError):
    pass


def triton_venv() -> Path:
    """Triton's venv: `$KAPI_TRITON_VENV`, read now, or /opt/kapi-triton/venv."""
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def triton_unavailable(venv: Path | None = None) -> str | None:
    """None when Triton is installed in `venv` (default: triton_venv()), else why not."""
    venv = venv or triton_venv()
    install = f"run `bash {SETUP.relative_to(SETUP.parents[2])}`"
    if not (venv / "bin" / "python").exists():
        return f"no Triton venv at {venv} ({VENV_ENV}): {install}"
    if not (venv / MARKER).is_file():
        return f"Triton venv {venv} is not fully installed (no {MARKER}): {install}"
    if not any(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver")):
        return f"no tritonserver in {venv}: {install}"
    return None


@dataclass
class RunningTriton(ServerProcess):
    repository: Path = Path()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (Triton unloads its models and exits 0 in about 3 s), SIGKILL if it hangs."""
        return terminate(self.process, timeout_s)


def start_triton(
    models: Mapping[str, TritonModel],
    workdir: Path,
    log_dir: Path,
    *,
    args: Sequence[str] = (),
    venv: Path | None = None,
    attempts: int = 3,
) -> RunningTriton:
    """A ready tritonserver serving `models` from a python-backend repository written under
    `workdir` (its `repository` folder), logging to `log_dir`. `args` are more tritonserver
    flags (e.g. "--model-control-mode=explicit"). Raises TritonFailedToStart, with the log's
    tail, when it exits or is not ready within READY_TIMEOUT_S."""
    venv = venv or triton_venv()
    if (reason := triton_unavailable(venv)) is not None:
        raise TritonFailedToStart(reason)
    root = tritonpeer.write_python_repository(
        {name: onnx for name, (onnx, _) in models.items()},
        workdir / "repository",
        {name: config for name, (_, config) in models.items()},
    )
    for attempt in range(attempts):
        server = _spawn(venv, root, log_dir, args, attempt)
        try:
            _wait(server)
        except TritonFailedToStart:
            server.terminate()
            if attempt + 1 < attempts and any(s in server.log().lower() for s in _PORT_TAKEN):
                continue
            raise
        return server
    raise AssertionError("unreachable")


def _spawn(
    venv: Path, root: Path, log_dir: Path, args: Sequence[str], attempt: int
) -> RunningTriton:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    argv, env = tritonpeer.triton_command(
        venv, root, grpc_port, http_port, metrics_port, extra_args=args
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"triton-{grpc_port}-{attempt}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return RunningTriton(process, grpc_port, http_port, metrics_port, log_path, root)


def _wait(server: RunningTriton) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise TritonFailedToStart(
                f"tritonserver exited with {server.process.returncode} "
                f"(log {server.log_path}):\n{server.log_tail()}"
            )
        if server.is_ready():
            return
        time.sleep(0.1)
    raise TritonFailedToStart(
        f"tritonserver not ready after {READY_TIMEOUT_S} s (log {server.log_path}):\n"
        f"{server.log_tail()}"
    )
