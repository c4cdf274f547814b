"""`make demo`: build an example model repository, serve it with a kapi node, query it with
tritonclient exactly as a Triton user would, and print what comes back.

Needs the dev extra (torch, onnx, openvino, tritonclient).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

CONFIG = """
name: "digits_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [{ name: "image", data_type: TYPE_FP32, dims: [1, 28, 28] }]
output [{ name: "logits", data_type: TYPE_FP32, dims: [10] }]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [{ count: 1, kind: KIND_CPU }]
"""


def build_repository(root: Path) -> None:
    """A small CNN exported to ONNX (with a Triton config) and to OpenVINO IR (without)."""
    import openvino as ov
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    ).eval()  # fmt: skip
    onnx_path = root / "digits_onnx" / "1" / "model.onnx"
    onnx_path.parent.mkdir(parents=True)
    with warnings.catch_warnings():  # the TorchScript exporter needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 28, 28),), str(onnx_path), input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    (root / "digits_onnx" / "config.pbtxt").write_text(CONFIG)
    ir_path = root / "digits_openvino" / "1" / "model.xml"
    ir_path.parent.mkdir(parents=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(ir_path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(client: object, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the node exited before it was ready")
        try:
            if client.is_server_ready():  # type: ignore[attr-defined]
                return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("the node did not become ready within 60 s")


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


def main() -> None:
    import tritonclient.grpc as grpcclient

    with tempfile.TemporaryDirectory(prefix="kapi-demo-") as tmp:
        root = Path(tmp) / "models"
        print(f"1. building an example model repository in {root}")
        build_repository(root)
        ports = {name: free_port() for name in ("grpc", "http", "metrics")}
        command = [
            sys.executable, "-m", "kapi.cli", "node", "--model-repository", str(root),
            "--host", "127.0.0.1", "--grpc-port", str(ports["grpc"]),
            "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"]),
        ]  # fmt: skip
        print("2. starting a node:", " ".join(command[2:]))
        process = subprocess.Popen(command)
        url = f"127.0.0.1:{ports['grpc']}"
        client = grpcclient.InferenceServerClient(url)
        try:
            wait_ready(client, process)
            run_queries(client, url)
        finally:
            process.terminate()
            print("5. SIGTERM: the node drains and exits with", process.wait(timeout=30))


def run_queries(client: object, url: str) -> None:
    import tritonclient.grpc as grpcclient

    metadata = client.get_server_metadata()  # type: ignore[attr-defined]
    print(f"3. server {metadata.name} {metadata.version}, models:")
    for model in client.get_model_repository_index().models:  # type: ignore[attr-defined]
        meta = client.get_model_metadata(model.name)  # type: ignore[attr-defined]
        shapes = [f"{t.name}{list(t.shape)} {t.datatype}" for t in meta.inputs]
        print(f"   {model.name} v{model.version} {model.state} on {meta.platform}: {shapes}")
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    answers = {}
    for name in ("digits_onnx", "digits_openvino"):
        tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        answers[name] = client.infer(name, [tensor]).as_numpy("logits")  # type: ignore[attr-defined]
        print(f"4. {name}: a batch of 4, predicted classes {answers[name].argmax(axis=1).tolist()}")
    gap = float(np.abs(answers["digits_onnx"] - answers["digits_openvino"]).max())
    print(f"   ONNX Runtime and OpenVINO agree to {gap:.2e}")
    singles = asyncio.run(burst(url, images))
    print(f"   4 concurrent single-image requests give the same answers: "
          f"{np.allclose(np.stack(singles), answers['digits_onnx'], atol=1e-5)}")  # fmt: skip
    stats = client.get_inference_statistics("digits_onnx").model_stats[0]  # type: ignore[attr-defined]
    batches = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    print(f"   digits_onnx: {stats.inference_count} inferences in {stats.execution_count} "
          f"executions; executions by batch size: {batches}")  # fmt: skip


if __name__ == "__main__":
    main()
