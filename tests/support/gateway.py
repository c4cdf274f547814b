"""Start a real `kapi gateway` process on loopback ports and wait until it is ready."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.node import _PORT_TAKEN, HOST, KAPI, ServerProcess, free_port

READY_TIMEOUT_S = 60.0


class GatewayFailedToStart(RuntimeError):
    pass


@dataclass
class RunningGateway(ServerProcess):
    token: str | None = None

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.request(
            method, f"{self.http_url}{path}", headers=headers, timeout=10.0, **kwargs
        )

    def backends(self) -> dict[str, dict[str, Any]]:
        response = self.admin("GET", "/v1/backends")
        response.raise_for_status()
        return {entry["address"]: entry for entry in response.json()}

    def wait_for(self, what: str, check: Any, timeout_s: float = 30.0) -> None:
        """Poll the backends' state until `check(backends)` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check(self.backends()):
                return
            time.sleep(0.1)
        raise AssertionError(f"gateway: not {what} after {timeout_s} s: {self.backends()}")


def start_gateway(
    backends: Sequence[str],
    log_dir: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    attempts: int = 3,
) -> RunningGateway:
    """A `kapi gateway` over `backends` (HOST:PORT), ready (some backend healthy) unless
    `wait_ready` is False."""
    flags = [item for address in backends for item in ("--backend", address)]
    token = None
    if "--admin-token" in args:
        token = args[list(args).index("--admin-token") + 1]
    for attempt in range(attempts):
        gateway = _spawn(log_dir, [*flags, *args], env or {}, attempt, token)
        try:
            _wait(gateway, wait_ready)
        except GatewayFailedToStart:
            gateway.terminate()
            if attempt + 1 < attempts and any(s in gateway.log().lower() for s in _PORT_TAKEN):
                continue
            raise
        return gateway
    raise AssertionError("unreachable")


def _spawn(
    log_dir: Path, flags: Sequence[str], env: Mapping[str, str], attempt: int, token: str | None
) -> RunningGateway:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        str(KAPI), "gateway",
        "--host", HOST,
        "--grpc-port", str(grpc_port),
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
        "--health-interval-s", "0.2",
        *flags,
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"gateway-{grpc_port}-{attempt}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    return RunningGateway(process, grpc_port, http_port, metrics_port, log_path, token)


def _wait(gateway: RunningGateway, wait_ready: bool) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise GatewayFailedToStart(
                f"kapi gateway exited with {gateway.process.returncode}:\n{gateway.log()}"
            )
        if gateway.is_ready():
            return
        if not wait_ready:
            try:
                httpx.get(f"{gateway.http_url}/v2/health/live", timeout=2.0)
                return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise GatewayFailedToStart(
        f"kapi gateway not ready after {READY_TIMEOUT_S} s:\n{gateway.log()}"
    )
