"""The demo's hardening stage: a broken model fails alone and is named; a malformed request
is refused at once while health probes go on; SIGTERM under load cancels nothing."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kapi.demo._repository import BROKEN, add_broken_model, remove_broken_model
from kapi.demo._serving import HOST

CLIENTS = 16


def broken_model(client: Any, root: Path) -> None:
    from tritonclient.utils import InferenceServerException

    add_broken_model(root)
    try:
        client.load_model(BROKEN)
    except InferenceServerException as exc:
        print(f"6. loading {BROKEN} fails alone: {exc.status()} {exc.message()}")
    rows = {m.name: m for m in client.get_model_repository_index().models}
    print(f"   index: {BROKEN} {rows[BROKEN].state}; digits_onnx {rows['digits_onnx'].state}")
    print(f"   strict readiness (Triton's default): server ready = {client.is_server_ready()}")
    client.unload_model(BROKEN)
    remove_broken_model(root)
    print(f"   after unloading it: server ready = {client.is_server_ready()}")


# Probes /v2/health/live from a process of its own (the demo's own threads share its GIL
# with the client building the request) until stdin closes; prints the count and the
# slowest answer in ms.
PROBE = """
import sys, threading, time, httpx
done = threading.Event()
http = httpx.Client(timeout=10)
http.get(sys.argv[1]).raise_for_status()  # connected: from here on, every answer counts
print("probing", flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
slowest, count = 0.0, 0
while not done.is_set():
    start = time.perf_counter()
    http.get(sys.argv[1]).raise_for_status()
    slowest, count = max(slowest, time.perf_counter() - start), count + 1
    done.wait(0.005)
print(count, round(slowest * 1000))
"""


def malformed_request(url: str, http_port: int) -> None:
    """10 M empty BYTES elements (38 MiB) sent for a tensor of 4, while a probe watches."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="text_echo")
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 4])
    request.raw_input_contents.append(bytes(4 * 10_000_000))
    live = f"http://{HOST}:{http_port}/v2/health/live"
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, live], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert probe.stdout is not None
    probe.stdout.readline()  # "probing"
    took = []
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            start = time.perf_counter()
            try:
                stub.ModelInfer(request, timeout=60)
            except grpc.RpcError as exc:
                answer = f"{exc.code().name}: {exc.details()}"
            took.append(time.perf_counter() - start)
    count, slowest = probe.communicate(b"")[0].split()
    print(f"7. a malformed 38 MiB BYTES request, sent 3 times, is refused in "
          f"{max(took) * 1000:.0f} ms at most: {answer}")  # fmt: skip
    print(f"   /v2/health/live, probed from another process, answered {int(count)} probes "
          f"meanwhile, the slowest in {int(slowest)} ms")  # fmt: skip


def sigterm_under_load(url: str, process: subprocess.Popen[bytes]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    answered: queue.Queue[bool] = queue.Queue()
    endings: queue.Queue[str] = queue.Queue()
    image = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)

    def keep_sending() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            tensor = grpcclient.InferInput("image", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(image)
            while True:
                try:
                    client.infer("digits_onnx", [tensor], client_timeout=30)
                    answered.put(True)
                except InferenceServerException as exc:
                    endings.put(str(exc.status()).removeprefix("StatusCode."))
                    return

    threads = [threading.Thread(target=keep_sending) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    while answered.qsize() < 10 * CLIENTS:
        time.sleep(0.01)
    process.terminate()
    for thread in threads:
        thread.join(60)
    code = process.wait(timeout=60)
    statuses = [endings.get_nowait() for _ in range(endings.qsize())]
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    print(f"8. SIGTERM with {CLIENTS} clients sending: {answered.qsize()} requests answered; "
          f"each client's next request ended {counts} (CANCELLED: "
          f"{counts.get('CANCELLED', 0)}); the node exited with {code}")  # fmt: skip
