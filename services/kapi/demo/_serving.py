"""The demo's node: started as a user starts one, queried with tritonclient exactly as a
Triton user would."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_node(root: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {name: free_port() for name in ("grpc", "http", "metrics")}
    command = [
        sys.executable, "-m", "kapi.cli", "node", "--model-repository", str(root),
        "--host", HOST, "--grpc-port", str(ports["grpc"]),
        "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"]),
        "--model-control-mode", "explicit", "--load-model", "*", "--log-level", "WARNING",
    ]  # fmt: skip
    print("2. starting a node: kapi", " ".join(command[3:]))
    return subprocess.Popen(command), ports


def wait_ready(client: Any, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the node exited before it was ready")
        try:
            if client.is_server_ready():
                return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("the node did not become ready within 60 s")


def run_queries(client: Any, url: str) -> None:
    import tritonclient.grpc as grpcclient

    metadata = client.get_server_metadata()
    print(f"3. server {metadata.name} {metadata.version}, models:")
    for model in client.get_model_repository_index().models:
        meta = client.get_model_metadata(model.name)
        shapes = [f"{t.name}{list(t.shape)} {t.datatype}" for t in meta.inputs]
        print(f"   {model.name} v{model.version} {model.state} on {meta.platform}: {shapes}")
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    answers = {}
    for name in ("digits_onnx", "digits_openvino"):
        tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        answers[name] = client.infer(name, [tensor]).as_numpy("logits")
        print(f"4. {name}: a batch of 4, predicted classes {answers[name].argmax(axis=1).tolist()}")
    gap = float(np.abs(answers["digits_onnx"] - answers["digits_openvino"]).max())
    print(f"   ONNX Runtime and OpenVINO agree to {gap:.2e} (both compute in FP32)")
    singles = asyncio.run(burst(url, images))
    print(f"   4 concurrent single-image requests give the same answers: "
          f"{np.allclose(np.stack(singles), answers['digits_onnx'], atol=1e-5)}")  # fmt: skip
    stats = client.get_inference_statistics("digits_onnx").model_stats[0]
    batches = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    print(f"   digits_onnx: {stats.inference_count} inferences in {stats.execution_count} "
          f"executions; executions by batch size: {batches}")  # fmt: skip


async def burst(url: str, images: np.ndarray) -> list[np.ndarray]:
    """Send one request per image at once, so the dynamic batcher can merge them."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpcclient_aio

    async with grpcclient_aio.InferenceServerClient(url) as client:

        async def one(image: np.ndarray) -> np.ndarray:
            tensor = grpcclient.InferInput("image", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(image[None])
            result = await client.infer("digits_onnx", [tensor])
            logits: np.ndarray = result.as_numpy("logits")[0]
            return logits

        return list(await asyncio.gather(*(one(image) for image in images)))
