"""The servers of the gateway bench: one kapi node serving the two Identity models, the kapi
gateway in front of it, and nginx as a plain gRPC proxy in front of it, each a subprocess in a
session of its own on loopback ports (`nodebench.process.serving`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import onnx
from nodebench.process import HOST, Ports, ServerCommand, free_ports
from onnx import TensorProto, helper

from gatewaybench.shapes import INPUT, OUTPUT, REQUESTS

OPSET = 17
NGINX = Path("/usr/sbin/nginx")
GATEWAY_READY_TIMEOUT_S = 60.0
# nginx's options beyond a bare `grpc_pass`, each with why it is set. The `nginx` contender
# has them all; `nginx-default-buffers` drops the buffer and chunk sizes (marked True),
# keeping the connection reuse, to show what the defaults cost.
NGINX_OPTIONS: list[tuple[str, bool, str]] = [
    ("worker_processes 1", False, "one worker: the machine has 2 cores, shared with the rest"),
    ("access_log off", False, "the gateway writes no access log either"),
    (
        "listen ... http2",
        False,
        "gRPC needs HTTP/2 on the client side (plaintext, prior knowledge)",
    ),
    (
        "upstream { keepalive 32; keepalive_requests 1000000; }",
        False,
        "reuse upstream connections (nginx opens one per request otherwise, and retires a "
        "kept one after 1000 requests by default); nginx does not multiplex streams on an "
        "upstream connection, so it holds one per request in flight",
    ),
    (
        "keepalive_requests 1000000",
        False,
        "nginx ends a client's HTTP/2 connection after 1000 requests by default (GOAWAY), "
        "which would make the shared-connection client reconnect every ~1000 requests",
    ),
    ("client_max_body_size 64m", False, "the gateway's limit; nginx's default is 1m"),
    (
        "grpc_buffer_size 1m",
        True,
        "the buffer for the upstream's response (default 4k/8k, a page): the 600 KB answer "
        "would be read and forwarded a page at a time",
    ),
    (
        "http2_chunk_size 1m",
        True,
        "the largest DATA frame nginx sends a client (default 8k): the 600 KB answer would "
        "reach the Python client in 8 KB frames",
    ),
    (
        "client_body_buffer_size 1m",
        True,
        "the buffer the request body is read into and forwarded from (default 8k/16k, two pages)",
    ),
    (
        "http2_body_preread_size 1m",
        True,
        "the per-stream window nginx offers the client (default 64k): the 600 KB request "
        "would wait on window updates",
    ),
    ("http2_recv_buffer_size 1m", True, "the worker's read buffer (default 256k)"),
]


def write_models(directory: Path) -> dict[str, Path]:
    """One ONNX Identity per request, FP32, `[batch, *shape]`: the node copies and no more."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for request in REQUESTS:
        dims: list[str | int] = ["batch", *request.shape[1:]]
        graph = helper.make_graph(
            [helper.make_node("Identity", [INPUT], [OUTPUT])],
            request.name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, dims)],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8
        )
        onnx.checker.check_model(model)
        paths[request.name] = directory / f"{request.name}.onnx"
        onnx.save(model, str(paths[request.name]))
    return paths


def node_command(root: Path, models: dict[str, Path]) -> ServerCommand:
    """`kapi node` serving every model, one instance each, ONNX Runtime on one thread, no
    batching: nodebench's repository writer and command line."""
    # nodebench.servers pulls torch in (through nodebench.models); imported here, not at the
    # top, so that the spawned client processes, which import this module again through
    # bench/gateway.py, stay light.
    from nodebench.models import read_spec
    from nodebench.servers import Deployment, ServingSettings, kapi_command

    settings = ServingSettings(
        intra_op_threads=1,
        inter_op_threads=1,
        max_batch_size=16,
        max_queue_delay_us=0,
        mlserver_workers=0,
    )
    deployments = [
        Deployment(name, read_spec(name, path), instances=1, batching=False)
        for name, path in models.items()
    ]
    return kapi_command(root, deployments, settings)


def gateway_command(root: Path, backend: str) -> ServerCommand:
    """`kapi gateway` with the node as its one static backend, as it is shipped (no flags
    beyond the addresses)."""
    root.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    argv = [sys.executable, "-m", "kapi.cli", "gateway", "--backend", backend, "--host", HOST]
    argv += ["--grpc-port", str(ports.grpc), "--http-port", str(ports.http)]
    argv += ["--metrics-port", str(ports.metrics), "--log-level", "WARNING"]
    return ServerCommand("kapi gateway", argv, root, root.with_suffix(".log"), ports)


def floor_command(root: Path, backend: str) -> ServerCommand:
    """floor.py: a bare raw-bytes grpc.aio proxy on the gateway's stack, no features."""
    root.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    argv = [sys.executable, str(Path(__file__).with_name("floor.py")), "--backend", backend]
    argv += ["--grpc-port", str(ports.grpc), "--http-port", str(ports.http)]
    return ServerCommand("python-floor", argv, root, root.with_suffix(".log"), ports)


def nginx_command(root: Path, name: str, backend: str, tuned: bool) -> ServerCommand:
    """nginx as its own master (`-p`, `-c`, `daemon off`) in `root`: a gRPC listener that
    `grpc_pass`es everything to `backend`, and a plain HTTP listener that answers
    /v2/health/ready, which `serving` waits for."""
    root.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    conf = root / "nginx.conf"
    conf.write_text(_nginx_conf(root, ports, backend, tuned))
    argv = [str(NGINX), "-p", f"{root}/", "-c", str(conf), "-g", "daemon off;"]
    return ServerCommand(name, argv, root, root.with_suffix(".log"), ports)


def _nginx_conf(root: Path, ports: Ports, backend: str, tuned: bool) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {root}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    buffers = ""
    if tuned:
        buffers = """
        grpc_buffer_size 1m;
        http2_chunk_size 1m;
        client_body_buffer_size 1m;
        http2_body_preread_size 1m;"""
    recv_buffer = "    http2_recv_buffer_size 1m;\n" if tuned else ""
    # As root, the worker would run as nobody, which cannot enter the temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""# written by bench/gateway.py
{user}worker_processes 1;
pid {root}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
{temp}
{recv_buffer}    upstream node {{
        server {backend};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{ports.grpc} http2;
        keepalive_requests 1000000;
        client_max_body_size 64m;{buffers}
        location / {{
            grpc_pass grpc://node;
        }}
    }}
    server {{
        listen {HOST}:{ports.http};
        location = /v2/health/ready {{
            return 200;
        }}
    }}
}}
"""


HAPROXY = Path("/usr/sbin/haproxy")


def haproxy_command(root: Path, backend: str) -> ServerCommand:
    """HAProxy 2.6 (Debian) as a gRPC proxy that reads the model name from each request's
    body (`req.body,ungrpc(1)`, the way it could route on it) before passing it on: what an
    existing engine costs when it inspects the body, against the gateway. One thread, the
    buffer large enough for the 600 KB message (a body must fit it to be inspected)."""
    root.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    conf = root / "haproxy.cfg"
    conf.write_text(f"""# written by bench/gateway.py
global
    nbthread 1
    tune.bufsize 1048576
    tune.h2.initial-window-size 1048576
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend grpc
    bind {HOST}:{ports.grpc} proto h2
    option http-buffer-request
    http-request set-var(txn.model) req.body,ungrpc(1)
    use_backend node if {{ var(txn.model) -m found }}
    default_backend node
frontend health
    bind {HOST}:{ports.http}
    http-request return status 200
backend node
    http-reuse always
    server node {backend} proto h2
""")
    argv = [str(HAPROXY), "-f", str(conf), "-db"]
    return ServerCommand("haproxy", argv, root, root.with_suffix(".log"), ports)


def ensure_nginx() -> None:
    """nginx from Debian when it is missing and this runs as root with apt-get; else a clear
    error."""
    if NGINX.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"{NGINX} is missing: apt-get install nginx (or leave nginx out)")
    print("installing Debian's nginx ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "-qq", "update"], check=True, env=env)
    subprocess.run(
        ["apt-get", "-qq", "install", "-y", "nginx"], check=True, env=env, stdout=subprocess.DEVNULL
    )


def nginx_version() -> str | None:
    if not NGINX.exists():
        return None
    result = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True, check=False)
    return result.stderr.strip().removeprefix("nginx version: ")


def wait_gateway_backends(ports: Ports, models: list[str]) -> list[dict[str, object]]:
    """Until the gateway's admin API (`GET /v1/backends`) shows a healthy backend serving
    every model; its answer."""
    url = f"http://{ports.http_url}/v1/backends"
    deadline = time.monotonic() + GATEWAY_READY_TIMEOUT_S
    backends: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                backends = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            backends = []
        for backend in backends:
            served = backend.get("models")
            if backend.get("healthy") and isinstance(served, dict) and set(models) <= set(served):
                return backends
        time.sleep(0.25)
    raise TimeoutError(f"the gateway's {url} did not show the node's models: {backends}")


def alive(pid: int) -> bool:
    """Whether the process is there and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
