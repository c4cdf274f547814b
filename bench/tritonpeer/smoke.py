"""Smoke check of the Triton peer: a tiny ONNX add/sub model served by tritonserver 2.51.0
through the python backend, queried with tritonclient.grpc. Run with kapi's venv:

    .venv/bin/python bench/tritonpeer/smoke.py [--venv /opt/kapi-triton/venv] [--keep]

It runs bench/tritonpeer/setup.sh first (a no-op once installed), prints the startup time and exits
non-zero on any failure. The repository and server log go to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from repository import DEFAULT_VENV, triton_command, write_python_repository

CONFIG = """max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def add_sub_model() -> bytes:
    def tensors(*names: str) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16]) for n in names]

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        tensors("INPUT0", "INPUT1"),
        tensors("OUTPUT0", "OUTPUT1"),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def check(client: grpcclient.InferenceServerClient, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(-1000, 1000, (rows, 16), dtype=np.int32) for _ in range(2))
    inputs = [grpcclient.InferInput(n, [rows, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    setup = Path(__file__).with_name("setup.sh")
    env = {**os.environ, "KAPI_TRITON_VENV": str(args.venv)}
    subprocess.run(["bash", str(setup)], check=True, env=env, stdout=subprocess.DEVNULL)

    work = Path(tempfile.mkdtemp(prefix="kapi-triton-smoke-"))
    root = write_python_repository({"add_sub": add_sub_model()}, work / "repo", {"add_sub": CONFIG})
    grpc_port, http_port, metrics_port = free_ports(3)
    argv, server_env = triton_command(args.venv, root, grpc_port, http_port, metrics_port)
    log = work / "tritonserver.log"
    print(" ".join(argv), f"> {log}", flush=True)
    with log.open("wb") as out:
        server = subprocess.Popen(argv, env=server_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        ready_url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        startup = wait_ready(ready_url, server, timeout=120)
        print(f"ready in {startup:.2f} s ({ready_url} 200)")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        metadata = client.get_server_metadata()
        print(f"server {metadata.name} {metadata.version}")
        assert metadata.version == "2.51.0", metadata.version
        assert client.is_model_ready("add_sub")
        check(client, rows=3, seed=0)
        with ThreadPoolExecutor(4) as pool:  # concurrent requests, merged by the batcher
            list(pool.map(lambda i: check(client, rows=1 + i % 3, seed=i), range(16)))
        stats = client.get_inference_statistics("add_sub").model_stats[0]
        print(f"{stats.inference_count} rows in {stats.execution_count} executions")
        client.close()
    except Exception:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        stop(server)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    assert server.returncode == 0, f"tritonserver exited with {server.returncode}"
    print("smoke check passed")
    return 0


def stop(server: subprocess.Popen[bytes]) -> None:
    start = time.monotonic()
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    print(f"stopped in {time.monotonic() - start:.2f} s, exit {server.returncode}")


if __name__ == "__main__":
    sys.exit(main())
