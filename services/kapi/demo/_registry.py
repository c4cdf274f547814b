"""The demo's model repository stage: `kapi repository serve`, the demo's CNN pushed with the
`kapi` commands, a node that serves it through `digits@production`, and an alias move under
traffic that the node follows without a failed request."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kapi.demo._serving import HOST, free_port, wait_ready

SIGNATURE = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    "max_batch_size": 16,
}


def model_repository(root: Path, base: Path) -> None:
    """Everything in `base`: the repository's data, the node's cache and log, the export."""
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    data = base / "data"
    print("9. the model repository: kapi repository serve --data DIR --port PORT")
    node = None
    with running_repository(data) as (url, env):
        try:
            files = base / "push"
            files.mkdir(parents=True)
            (files / "signature.json").write_text(json.dumps(SIGNATURE))
            (files / "lineage.json").write_text(
                json.dumps({"code_version": "demo", "dataset": "none: random weights"})
            )
            onnx_file = root / "digits_onnx" / "1" / "model.onnx"
            _kapi(env, "push", "digits", str(onnx_file), "--runtime", "onnxruntime",
                  "--profile", "cpu-x86_64", "--signature", str(files / "signature.json"),
                  "--lineage", str(files / "lineage.json"),
                  "--description", "demo CNN")  # fmt: skip
            refused = _kapi(env, "promote", "digits", "1", check=False)
            print(f"   promote without a verification report is refused: {refused.strip()}")
            _kapi(env, "promote", "digits", "1", "--force", quiet=True)
            print("   (no verifier yet: `--force` moves production, and the event log says so)")

            node, grpc_port, node_log = _start_node(url, base / "node-cache")
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(f"{HOST}:{grpc_port}")
            wait_ready(client, node)
            profiles = [e for e in client.get_server_metadata().extensions if e.startswith("kapi-")]
            print(f"   a node follows digits@production; it reports {', '.join(profiles)}")
            print(f"   it answers from version {_infer(client)[0]}")

            # Version 2: the ONNX model and its OpenVINO IR (a directory, sent as tar), each
            # measured here, so that the repository can pick the faster one for this node.
            _kapi(env, "push", "digits", str(onnx_file), "--runtime", "onnxruntime",
                  "--profile", "cpu-x86_64", quiet=True)  # fmt: skip
            _kapi(env, "push", "digits", str(root / "digits_openvino" / "1"), "--version", "2",
                  "--runtime", "openvino", "--profile", "cpu-x86_64", quiet=True)  # fmt: skip
            _record_benchmarks(url, data / "admin-token", root, profiles[0].split(":", 1)[1])
            _kapi(env, "versions", "digits")
            answers, failures, stop = _traffic(client)
            moved = time.monotonic()
            _kapi(env, "promote", "digits", "2", "--force", quiet=True)
            while not answers or answers[-1][0] != "2":
                time.sleep(0.01)
            switched = time.monotonic() - moved
            time.sleep(0.3)
            stop.set()
            print(f"   production moved to version 2 under traffic: the node served it "
                  f"{switched:.2f} s after `kapi promote` started")  # fmt: skip
            print(f"   {len(answers)} requests, {len(failures)} failed")
            chosen = _serving_variant(node_log, 2)
            print(f"   for its profiles it chose the faster variant: {chosen}")
            export = base / "export"
            _kapi(env, "repository", "export", "--alias", "production", str(export), quiet=True)
            written = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
            print(f"   kapi repository export --alias production: Triton's layout, {written}")
        finally:
            if node is not None and node.poll() is None:
                node.terminate()
                node.wait(30)


@contextlib.contextmanager
def running_repository(data: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`kapi repository serve` on `data`: its URL, and an environment with its admin token."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    serve = [
        sys.executable, "-m", "kapi.cli", "repository", "serve", "--host", HOST,
        "--port", str(port), "--data", str(data), "--log-level", "WARNING",
    ]  # fmt: skip
    registry = subprocess.Popen(serve, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"{url}/healthz", registry)
        env = {
            **os.environ,
            "KAPI_REPOSITORY_URL": url,
            "KAPI_TOKEN_FILE": str(data / "admin-token"),
        }
        yield url, env
    finally:
        if registry.poll() is None:
            registry.terminate()
            registry.wait(30)


def _kapi(env: dict[str, str], *args: str, check: bool = True, quiet: bool = False) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kapi.cli", *args], env=env, capture_output=True, text=True
    )
    if check and done.returncode != 0:
        raise SystemExit(f"kapi {' '.join(args)} failed: {done.stderr}")
    if not quiet and done.returncode == 0:
        print(f"   $ kapi {' '.join(a if len(a) < 40 else '…/' + Path(a).name for a in args)}")
        print("\n".join(f"     {line}" for line in done.stdout.splitlines()))
    return done.stdout + done.stderr


def _start_node(url: str, cache: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    ports = [free_port() for _ in range(3)]
    command = [
        sys.executable, "-m", "kapi.cli", "node", "--repository", url,
        "--serve", "digits@production", "--cache-dir", str(cache), "--host", HOST,
        "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
        "--metrics-port", str(ports[2]), "--log-format", "json",
    ]  # fmt: skip
    log = cache.parent / "node.log"
    with log.open("wb") as file:
        return subprocess.Popen(command, stderr=file), ports[0], log


def _serving_variant(log: Path, version: int) -> str:
    """The variant the node switched to, from its JSON log."""
    for line in log.read_text().splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("msg") == "switching model" and record.get("version") == version:
            return str(record["variant"])
    return "(not in the log)"


def _record_benchmarks(url: str, token_file: Path, root: Path, profile: str) -> None:
    """Measure both variants of version 2 here and record it in the repository."""
    from kapi.repository.client import RepositoryClient

    images = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    latencies = {"onnxruntime": _latency_onnxruntime(root, images),
                 "openvino": _latency_openvino(root, images)}  # fmt: skip
    with RepositoryClient(url, token_file.read_text().strip()) as client:
        for runtime, ms in latencies.items():
            client.set_benchmarks(
                "digits", 2, (runtime, "fp32", "cpu-x86_64"), {profile: {"latency_p50_ms": ms}}
            )
    print("   measured on " + profile + ": " + ", ".join(
        f"{runtime} {ms:.3f} ms" for runtime, ms in latencies.items()))  # fmt: skip


def _median_ms(run: Any, images: np.ndarray) -> float:
    for _ in range(20):
        run(images)
    times = []
    for _ in range(200):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _latency_onnxruntime(root: Path, images: np.ndarray) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(root / "digits_onnx" / "1" / "model.onnx"), options)
    return _median_ms(lambda x: session.run(None, {"image": x}), images)


def _latency_openvino(root: Path, images: np.ndarray) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(root / "digits_openvino" / "1" / "model.xml"), "CPU", {"INFERENCE_NUM_THREADS": 1}
    )
    request = compiled.create_infer_request()
    return _median_ms(lambda x: request.infer([x]), images)


def _traffic(client: Any) -> tuple[list[tuple[str, int]], list[Exception], threading.Event]:
    answers: list[tuple[str, int]] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            try:
                answers.append(_infer(client))
            except Exception as exc:
                failures.append(exc)

    threading.Thread(target=send, daemon=True).start()
    return answers, failures, stop


def _infer(client: Any) -> tuple[str, int]:
    import tritonclient.grpc as grpcclient

    image = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    tensor = grpcclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    result = client.infer("digits", [tensor])
    return result.get_response().model_version, int(result.as_numpy("logits").argmax())


def _wait_http(url: str, process: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the repository exited before it answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the repository did not answer within 60 s")
