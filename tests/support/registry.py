"""Start a real `kapi repository serve` process on a loopback port and wait until it answers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.node import HOST, KAPI, free_port, terminate

READY_TIMEOUT_S = 60.0


@dataclass
class RunningRepository:
    process: subprocess.Popen[bytes]
    port: int
    data: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin_token(self) -> str:
        """The write token a repository configured without tokens makes in DATA."""
        return (self.data / "admin-token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def terminate(self) -> int:
        return terminate(self.process)


def start_repository(
    data: Path,
    log_dir: Path,
    *,
    database: str | None = None,
    blobs: str | None = None,
    tokens: Sequence[Mapping[str, object]] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> RunningRepository:
    """A `kapi repository serve` on DATA, answering /healthz. `tokens`: written to a tokens
    file (else the repository makes its admin token)."""
    flags = ["--data", str(data)]
    if database:
        flags += ["--database", database]
    if blobs:
        flags += ["--blobs", blobs]
    if tokens is not None:
        tokens_file = data.with_name(data.name + "-tokens.json")
        tokens_file.write_text(json.dumps(list(tokens)))
        flags += ["--tokens-file", str(tokens_file)]
    port = port or free_port()
    log_path = log_dir / f"repository-{port}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(KAPI), "repository", "serve", "--host", HOST, "--port", str(port), *flags, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    running = RunningRepository(process, port, data, log_path)
    wait_healthy("the repository", running.url, process, running.log)
    return running


def wait_healthy(
    what: str, url: str, process: subprocess.Popen[bytes], log: Callable[[], str]
) -> None:
    """Until URL/healthz answers 200; killed, with its log in the error, if it never does."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{what} did not answer in {READY_TIMEOUT_S} s:\n{log()}")


@contextlib.contextmanager
def running_repository(data: Path, log_dir: Path, **kwargs: object) -> Iterator[RunningRepository]:
    repository = start_repository(data, log_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield repository
    finally:
        repository.terminate()
