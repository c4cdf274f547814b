"""The demo's gateway stage: two nodes with different hardware profiles behind one
`kapi gateway`; the demo's traffic goes through it, each request to a backend that serves
its model, then a hardware preference and a 90/10 split over two versions."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from kapi.demo._serving import HOST, free_port

# Profiles set with KAPI_PROFILES: this CPU stands in for a GPU node and an edge device.
NODES = {"gpu-node": "nvidia-sm90", "edge-node": "rpi5,cpu-arm64"}
SPLIT_REQUESTS = 1000


def gateway_stage(repository: Path, root: Path) -> None:
    """Serve the demo's CNN as versions 1 and 2 from two nodes, through a gateway."""
    shutil.rmtree(root, ignore_errors=True)
    models = root / "models"
    for version in (1, 2):
        target = models / "digits" / str(version)
        target.mkdir(parents=True)
        shutil.copyfile(repository / "digits_onnx" / "1" / "model.onnx", target / "model.onnx")
    config = (repository / "digits_onnx" / "config.pbtxt").read_text()
    config = config.replace('name: "digits_onnx"', 'name: "digits"')
    (models / "digits" / "config.pbtxt").write_text(config + "version_policy: { all { } }\n")
    shutil.copyfile(repository / "digits_onnx" / "labels.txt", models / "digits" / "labels.txt")
    with contextlib.ExitStack() as stack:
        nodes = {
            name: stack.enter_context(
                _process(root, name, ["node", "--model-repository", str(models)], profile)
            ).grpc
            for name, profile in NODES.items()
        }
        backends = [f"--backend={address}" for address in nodes.values()]
        gateway = stack.enter_context(_process(root, "gateway", ["gateway", *backends], ""))
        print(
            "13. a gateway over two nodes (profiles "
            + ", ".join(f"{name}: {profile}" for name, profile in NODES.items())
            + f"):\n   kapi gateway {' '.join(backends)}"
        )
        _wait_backends(gateway.admin, len(nodes))
        _traffic(gateway.grpc, gateway.admin, nodes)


def _traffic(gateway: str, admin: str, nodes: dict[str, str]) -> None:
    import tritonclient.grpc as grpcclient

    names = {address: name for name, address in nodes.items()}
    images = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    tensor = grpcclient.InferInput("image", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images)
    with grpcclient.InferenceServerClient(gateway) as client:
        before = _requests(admin)
        with ThreadPoolExecutor(8) as pool:  # 8 clients at once: outstanding requests differ
            list(pool.map(lambda _: client.infer("digits", [tensor]), range(200)))
        served = {names[a]: n - before[a] for a, n in _requests(admin).items()}
        print(f"   200 requests for digits from 8 clients, by backend (least outstanding, "
              f"power of two choices): {served}")  # fmt: skip
        before = _requests(admin)
        for _ in range(20):
            client.infer("digits", [tensor], parameters={"kapi-hardware": "edge,gpu"})
        served = {names[a]: n - before[a] for a, n in _requests(admin).items()}
        print(f"   20 with kapi-hardware=edge,gpu: {served}")
        route = {"split": {"1": 90, "2": 10}}
        httpx.put(f"{admin}/v1/routes/digits", json=route, timeout=10).raise_for_status()
        versions = collections.Counter(
            client.infer("digits", [tensor]).get_response().model_version
            for _ in range(SPLIT_REQUESTS)
        )
        share = versions["2"] / SPLIT_REQUESTS
        print(f"   PUT /v1/routes/digits {route}; {SPLIT_REQUESTS} requests by version: "
              f"{dict(sorted(versions.items()))} ({share:.1%} on version 2)")  # fmt: skip
        stats = client.get_inference_statistics("digits").model_stats
        summed = {s.version: s.inference_count for s in stats}
        print(f"   statistics through the gateway, summed over both nodes: {summed}")


def _requests(admin: str) -> dict[str, int]:
    backends = httpx.get(f"{admin}/v1/backends", timeout=10).json()
    return {entry["address"]: entry["requests"] for entry in backends}


def _wait_backends(admin: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            backends = httpx.get(f"{admin}/v1/backends", timeout=2).json()
            if len(backends) == count and all(b["healthy"] and b["models"] for b in backends):
                return
        time.sleep(0.2)
    raise SystemExit("the gateway did not see both nodes serve digits within 60 s")


@dataclass
class _Addresses:
    grpc: str  # host:port
    admin: str  # http://host:port


@contextlib.contextmanager
def _process(root: Path, name: str, command: list[str], profile: str) -> Iterator[_Addresses]:
    """A kapi process on free loopback ports, logging to root/NAME.log."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "KAPI_PROFILES": profile} if profile else dict(os.environ)
    log = (root / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kapi.cli", *command, "--host", HOST,
            "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--metrics-port", str(metrics_port), "--log-level", "WARNING",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield _Addresses(f"{HOST}:{grpc_port}", f"http://{HOST}:{http_port}")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
