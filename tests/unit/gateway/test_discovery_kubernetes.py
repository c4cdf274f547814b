"""Kubernetes discovery: EndpointSlice JSON to backends, the list-then-watch loop against a
fake SliceApi that serves the API server's JSON, and the real SliceApi against a loopback
HTTP server that answers as the API server does."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Generator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from kapi.core.errors import InvalidArgument, Unavailable
from kapi.gateway.discovery import BackendSpec
from kapi.gateway.discovery.endpointslices import SliceFields, SliceTable, is_ready, slice_backends
from kapi.gateway.discovery.kubernetes import (
    KubernetesDiscovery,
    KubernetesSliceApi,
    ResourceVersionExpired,
    SliceApi,
    WatchTiming,
)
from kubernetes import client
from urllib3.exceptions import ProtocolError

Json = dict[str, Any]
NAMESPACE = "serving"
SELECTOR = "app.kubernetes.io/part-of=kapi"
FAST = WatchTiming(watch_timeout_s=30, backoff_min_s=0.01, backoff_max_s=0.05)
FIELDS = SliceFields()

# As `kubectl get --raw /apis/discovery.k8s.io/v1/namespaces/serving/endpointslices/...`
# prints a slice of a Service with ports grpc, http and metrics.
NODE_SLICE = json.loads("""
{
  "kind": "EndpointSlice",
  "apiVersion": "discovery.k8s.io/v1",
  "metadata": {
    "name": "kapi-node-7xk2p",
    "generateName": "kapi-node-",
    "namespace": "serving",
    "uid": "0f5c5f1e-3b1d-4c47-9a57-7d1e2b6f9c01",
    "resourceVersion": "48213",
    "generation": 7,
    "creationTimestamp": "2025-03-02T10:15:04Z",
    "labels": {
      "app.kubernetes.io/name": "kapi-node",
      "app.kubernetes.io/part-of": "kapi",
      "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
      "kapi.dev/profile": "nvidia-h100",
      "kapi.dev/weight": "2.5",
      "kubernetes.io/service-name": "kapi-node"
    },
    "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-03-02T11:40:12Z"},
    "ownerReferences": [
      {"apiVersion": "v1", "kind": "Service", "name": "kapi-node",
       "uid": "5b6a2c0e-8e57-4bd4-a3a2-3f0c1e9d7a10", "controller": true,
       "blockOwnerDeletion": true}
    ]
  },
  "addressType": "IPv4",
  "endpoints": [
    {"addresses": ["10.244.1.17"], "conditions": {"ready": true, "serving": true,
     "terminating": false}, "nodeName": "gpu-a", "zone": "eu-west-1a",
     "targetRef": {"kind": "Pod", "namespace": "serving", "name": "kapi-node-0",
                   "uid": "a1f0c3f2-1111-4e7e-9a0a-1c2d3e4f5a60"}},
    {"addresses": ["10.244.2.9"], "conditions": {"ready": false, "serving": false,
     "terminating": false}, "nodeName": "gpu-b", "zone": "eu-west-1b",
     "targetRef": {"kind": "Pod", "namespace": "serving", "name": "kapi-node-1",
                   "uid": "b2e1d4a3-2222-4f8f-8b1b-2d3e4f5a6b71"}},
    {"addresses": ["10.244.3.4"], "conditions": {"ready": false, "serving": true,
     "terminating": true}, "nodeName": "gpu-c", "zone": "eu-west-1c",
     "targetRef": {"kind": "Pod", "namespace": "serving", "name": "kapi-node-2",
                   "uid": "c3f2e5b4-3333-4a9a-9c2c-3e4f5a6b7c82"}},
    {"addresses": ["10.244.1.23"], "conditions": {}, "nodeName": "gpu-a",
     "zone": "eu-west-1a"}
  ],
  "ports": [
    {"name": "metrics", "protocol": "TCP", "port": 9090},
    {"name": "grpc", "protocol": "TCP", "port": 8001, "appProtocol": "kubernetes.io/h2c"},
    {"name": "http", "protocol": "TCP", "port": 8000}
  ]
}
""")


def endpoint_slice(
    name: str,
    *endpoints: Json,
    version: str = "1000",
    address_type: str = "IPv4",
    ports: list[Json] | None = None,
    labels: dict[str, str] | None = None,
) -> Json:
    """An EndpointSlice as the controller writes it for Service `kapi-node`."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": "kapi-node-",
            "namespace": NAMESPACE,
            "uid": f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
            "resourceVersion": version,
            "generation": 1,
            "creationTimestamp": "2025-03-02T10:15:04Z",
            "labels": {
                "app.kubernetes.io/part-of": "kapi",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": "kapi-node",
                **(labels if labels is not None else {"kapi.dev/profile": "nvidia-h100"}),
            },
        },
        "addressType": address_type,
        "endpoints": list(endpoints) or None,  # the server writes no endpoints as null
        "ports": ports
        if ports is not None
        else [{"name": "grpc", "protocol": "TCP", "port": 8001}],
    }


def endpoint(address: str, ready: bool = True, terminating: bool = False) -> Json:
    return {
        "addresses": [address],
        "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
        "nodeName": "gpu-a",
        "zone": "eu-west-1a",
    }


def event(kind: str, item: Json) -> Json:
    return {"type": kind, "object": item}


def bookmark(version: str) -> Json:
    return event("BOOKMARK", {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                              "metadata": {"resourceVersion": version}})  # fmt: skip


GONE = event(
    "ERROR",
    {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
     "message": "too old resource version: 1000 (48213)", "reason": "Expired", "code": 410},
)  # fmt: skip


def addresses(backends: Collection[BackendSpec]) -> set[str]:
    return {backend.address for backend in backends}


# -- translation ------------------------------------------------------------------------


def test_a_real_slice_gives_its_ready_endpoints_with_profile_weight_and_ports() -> None:
    backends, problems = slice_backends(NODE_SLICE, FIELDS)
    assert problems == []
    assert set(backends) == {
        BackendSpec("10.244.1.17:8001", "nvidia-h100", "10.244.1.17:8000", 2.5),
        BackendSpec("10.244.1.23:8001", "nvidia-h100", "10.244.1.23:8000", 2.5),
    }
    assert backends[0].labels["kubernetes.io/service-name"] == "kapi-node"


@pytest.mark.parametrize(
    ("conditions", "ready"),
    [
        ({"ready": True, "serving": True, "terminating": False}, True),
        ({"ready": False, "serving": False, "terminating": False}, False),
        ({"ready": False, "serving": True, "terminating": True}, False),
        ({"ready": True, "serving": True, "terminating": True}, False),  # publishNotReady
        ({"serving": True}, True),  # no `ready`: an unknown state, read as ready
        ({}, True),
        (None, True),
    ],
)
def test_only_ready_endpoints_that_are_not_terminating_count(
    conditions: Json | None, ready: bool
) -> None:
    point: Json = {"addresses": ["10.244.1.17"]}
    if conditions is not None:
        point["conditions"] = conditions
    assert is_ready(point) is ready


def test_ipv6_addresses_are_bracketed() -> None:
    ports = [{"name": "grpc", "port": 8001}, {"name": "http", "port": 8000}]
    item = endpoint_slice("kapi-node-v6", endpoint("fd00:10:244::17"), address_type="IPv6",
                          ports=ports)  # fmt: skip
    [backend], _ = slice_backends(item, FIELDS)
    assert backend.address == "[fd00:10:244::17]:8001"
    assert backend.http_address == "[fd00:10:244::17]:8000"


def test_fqdn_addresses_are_host_names() -> None:
    item = endpoint_slice("external", endpoint("gpu-7.infer.example.com"), address_type="FQDN")
    assert addresses(slice_backends(item, FIELDS)[0]) == {"gpu-7.infer.example.com:8001"}


def test_an_unknown_address_type_names_nothing() -> None:
    item = endpoint_slice("odd", endpoint("10.244.1.17"), address_type="IPv5")
    assert slice_backends(item, FIELDS) == ([], ["addressType 'IPv5' is not IPv4, IPv6 or FQDN"])


def test_the_port_names_are_configurable_and_http_is_optional() -> None:
    fields = SliceFields(port_name="oip", http_port_name="rest")
    ports = [{"name": "oip", "protocol": "TCP", "port": 9001}, {"name": "http", "port": 8000}]
    [backend], _ = slice_backends(endpoint_slice("s", endpoint("10.0.0.1"), ports=ports), fields)
    assert (backend.address, backend.http_address) == ("10.0.0.1:9001", None)
    unnamed = [{"name": "", "protocol": "TCP", "port": 8001}]  # a Service's single port
    item = endpoint_slice("s", endpoint("10.0.0.1"), ports=unnamed)
    [backend], _ = slice_backends(item, SliceFields(port_name="", http_port_name=None))
    assert backend.address == "10.0.0.1:8001"


def test_a_slice_without_the_grpc_port_names_nothing_and_says_so() -> None:
    ports = [{"name": "http", "protocol": "TCP", "port": 8000},
             {"name": "grpc", "protocol": "UDP", "port": 8001}]  # fmt: skip
    item = endpoint_slice("s", endpoint("10.0.0.1"), ports=ports)
    assert slice_backends(item, FIELDS) == ([], ["no TCP port named 'grpc' (its ports: ['http'])"])


@pytest.mark.parametrize("text", ["heavy", "0", "-1", "inf", "nan", ""])
def test_a_bad_weight_label_is_weight_1_and_a_problem(text: str) -> None:
    item = endpoint_slice("s", endpoint("10.0.0.1"), labels={"kapi.dev/weight": text})
    [backend], problems = slice_backends(item, FIELDS)
    assert backend.weight == 1.0
    assert problems == [
        f"label kapi.dev/weight={text!r} is not a positive number: weight 1 instead"
    ]


def test_no_profile_label_is_no_profile_and_weight_1() -> None:
    [backend], problems = slice_backends(
        endpoint_slice("s", endpoint("10.0.0.1"), labels={}), FIELDS
    )
    assert (backend.profile, backend.weight, problems) == (None, 1.0, [])


def test_a_slice_with_no_endpoints_or_several_addresses() -> None:
    assert slice_backends(endpoint_slice("empty"), FIELDS) == ([], [])
    point = {"addresses": ["10.0.0.1", "10.0.0.2"], "conditions": {"ready": True}}
    assert addresses(slice_backends(endpoint_slice("s", point), FIELDS)[0]) == {"10.0.0.1:8001"}


def test_the_table_serves_one_backend_per_address_and_logs_a_problem_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kapi.gateway.discovery.endpointslices")
    table = SliceTable(FIELDS)
    table.replace(
        [endpoint_slice("a", endpoint("10.0.0.1")), endpoint_slice("b", endpoint("10.0.0.1"))]
    )
    assert addresses(table.backends()) == {"10.0.0.1:8001"}
    no_port = endpoint_slice("c", endpoint("10.0.0.3"), ports=[{"name": "http", "port": 8000}])
    for _ in range(3):
        table.apply("MODIFIED", no_port)
    assert caplog.text.count("EndpointSlice serving/c: no TCP port named 'grpc'") == 1
    table.apply("DELETED", no_port)
    table.apply("ADDED", no_port)  # a new slice of that name: its problem is news again
    assert caplog.text.count("EndpointSlice serving/c: no TCP port named 'grpc'") == 2
    table.apply("DELETED", endpoint_slice("a"))
    assert addresses(table.backends()) == {"10.0.0.1:8001"}  # b has it still


# -- the watch loop, against a fake SliceApi ------------------------------------------------

HOLD = "hold"  # in a watch script: a watch that stays open and quiet until interrupted
Step = Json | Exception | str
Script = list[Step]  # named out here: in FakeSliceApi's body, `list` is its method


class FakeSliceApi(SliceApi):
    """Answers lists and watches from scripts and records what it was asked. Once its
    watch scripts are used up, every watch holds."""

    def __init__(
        self, lists: list[tuple[list[Json], str] | Exception], watches: list[list[Step]]
    ) -> None:
        self.lists = deque(lists)
        self.watches = deque(watches)
        self.list_calls: list[tuple[str, str]] = []
        self.watch_calls: list[tuple[str, str, str, int]] = []
        self.closed_watches = 0
        self.interrupted = threading.Event()

    def list(self, namespace: str, selector: str) -> tuple[list[Json], str]:
        self.list_calls.append((namespace, selector))
        answer = self.lists.popleft() if len(self.lists) > 1 else self.lists[0]
        if isinstance(answer, Exception):
            raise answer
        return copy.deepcopy(answer[0]), answer[1]

    def watch(
        self, namespace: str, selector: str, resource_version: str, timeout_s: int
    ) -> Generator[Json, None, None]:
        self.watch_calls.append((namespace, selector, resource_version, timeout_s))
        return self._stream(self.watches.popleft() if self.watches else [HOLD])

    def _stream(self, script: Script) -> Generator[Json, None, None]:
        try:
            for step in script:
                if step == HOLD:
                    self.interrupted.wait(timeout=30)
                    return
                if isinstance(step, Exception):
                    raise step
                assert isinstance(step, dict)
                yield copy.deepcopy(step)
        finally:
            self.closed_watches += 1

    def interrupt(self) -> None:
        self.interrupted.set()

    def versions_watched(self) -> tuple[str, ...]:
        return tuple(call[2] for call in self.watch_calls)


class Published:
    """Every set a source published, in order."""

    def __init__(self) -> None:
        self.sets: list[frozenset[BackendSpec]] = []

    def __call__(self, backends: Collection[BackendSpec]) -> None:
        self.sets.append(frozenset(backends))

    def addresses(self) -> list[set[str]]:
        return [addresses(backends) for backends in self.sets]


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Polled: what the condition reads changes on the discovery's thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(discovery: KubernetesDiscovery) -> AsyncIterator[Published]:
    published = Published()
    task = asyncio.create_task(discovery.run(published))
    try:
        yield published
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def discovery_over(api: SliceApi) -> KubernetesDiscovery:
    return KubernetesDiscovery(NAMESPACE, SELECTOR, api=api, timing=FAST)


def slices(*items: Json, version: str = "1000") -> tuple[list[Json], str]:
    return [
        {k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items
    ], version


A = endpoint_slice("kapi-node-a", endpoint("10.0.0.1"), endpoint("10.0.0.2"), version="990")
B = endpoint_slice("kapi-node-b", endpoint("10.0.1.1"), version="1001")


async def test_it_lists_publishes_then_watches_from_the_lists_version() -> None:
    api = FakeSliceApi([slices(A)], [])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 1)
        assert published.addresses() == [{"10.0.0.1:8001", "10.0.0.2:8001"}]
        assert api.list_calls == [(NAMESPACE, SELECTOR)]
        assert api.watch_calls == [(NAMESPACE, SELECTOR, "1000", 30)]


async def test_an_empty_namespace_is_published_as_an_empty_set() -> None:
    api = FakeSliceApi([slices()], [])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 1)
        assert published.sets == [frozenset()]


async def test_added_modified_and_deleted_slices_change_the_set() -> None:
    a_one_down = endpoint_slice(
        "kapi-node-a", endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False), version="1002"
    )
    b_deleted = {**B, "metadata": {**B["metadata"], "resourceVersion": "1003"}}
    script: Script = [
        event("ADDED", B),
        event("MODIFIED", a_one_down),
        event("DELETED", b_deleted),
    ]
    api = FakeSliceApi([slices(A)], [script])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(published.sets) == 4)
        assert published.addresses() == [
            {"10.0.0.1:8001", "10.0.0.2:8001"},
            {"10.0.0.1:8001", "10.0.0.2:8001", "10.0.1.1:8001"},
            {"10.0.0.1:8001", "10.0.1.1:8001"},
            {"10.0.0.1:8001"},
        ]


async def test_nothing_is_published_when_the_set_does_not_change() -> None:
    trigger_time = {"endpoints.kubernetes.io/last-change-trigger-time": "2025-03-02T12:00:00Z"}
    touched = {**A, "metadata": {**A["metadata"], "resourceVersion": "1001",
                                 "annotations": trigger_time}}  # fmt: skip
    with_a_not_ready = endpoint_slice(
        "kapi-node-a",
        *(endpoint("10.0.0.1"), endpoint("10.0.0.2"), endpoint("10.0.0.3", ready=False)),
        version="1002",
    )
    no_grpc_port = endpoint_slice("metrics", endpoint("10.0.9.9"), version="1003",
                                  ports=[{"name": "metrics", "port": 9090}])  # fmt: skip
    script: Script = [
        event("MODIFIED", touched),
        event("MODIFIED", with_a_not_ready),
        event("ADDED", no_grpc_port),
        bookmark("1004"),
        event("ADDED", B),
    ]
    api = FakeSliceApi([slices(A)], [script])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 2)  # the script is done
        assert published.addresses() == [
            {"10.0.0.1:8001", "10.0.0.2:8001"},
            {"10.0.0.1:8001", "10.0.0.2:8001", "10.0.1.1:8001"},
        ]


async def test_a_dropped_watch_and_an_ended_one_resume_from_the_last_version() -> None:
    a_gone = {**A, "metadata": {**A["metadata"], "resourceVersion": "1010"}}
    drop = ProtocolError("Connection broken: IncompleteRead(0 bytes read)")
    api = FakeSliceApi(
        [slices(A)],
        [[event("ADDED", B), bookmark("1005"), drop], [event("DELETED", a_gone)]],
    )
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 3)
        assert api.versions_watched() == ("1000", "1005", "1010")
        assert len(api.list_calls) == 1
        assert published.addresses()[-1] == {"10.0.1.1:8001"}


@pytest.mark.parametrize(
    "gone",
    [GONE, ResourceVersionExpired("Expired: too old resource version")],
    ids=["event", "http"],
)
async def test_gone_lists_again_and_watches_from_the_new_list(gone: Step) -> None:
    api = FakeSliceApi([slices(A), slices(B, version="5000")], [[bookmark("1200"), gone]])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 2)
        assert len(api.list_calls) == 2
        assert api.versions_watched() == ("1000", "5000")
        assert published.addresses() == [{"10.0.0.1:8001", "10.0.0.2:8001"}, {"10.0.1.1:8001"}]


async def test_a_bookmark_moves_the_version_without_publishing() -> None:
    api = FakeSliceApi([slices(A)], [[bookmark("2000")]])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 2)
        assert api.versions_watched() == ("1000", "2000")
        assert len(published.sets) == 1


async def test_failures_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kapi.gateway.discovery.kubernetes")
    internal = event("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "message": "etcd is sad",
                               "reason": "InternalError", "code": 500})  # fmt: skip
    refused = client.ApiException(status=503, reason="Service Unavailable")
    api = FakeSliceApi([refused, slices(A)], [[internal]])
    async with running(discovery_over(api)) as published:
        await eventually(lambda: len(api.watch_calls) == 2)
        assert len(api.list_calls) == 2
        assert api.versions_watched() == ("1000", "1000")  # an error is not a new version
        assert len(published.sets) == 1
    assert "Service Unavailable" in caplog.text
    assert "InternalError: etcd is sad" in caplog.text


async def test_cancelling_run_stops_its_thread_and_its_watch() -> None:
    api = FakeSliceApi([slices(A)], [])
    discovery = discovery_over(api)
    task = asyncio.create_task(discovery.run(Published()))
    await eventually(lambda: len(api.watch_calls) == 1)
    [thread] = [t for t in threading.enumerate() if t.name == discovery.thread_name]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()
    assert api.interrupted.is_set()
    assert api.closed_watches == 1


def test_the_constructor_refuses_what_cannot_work(tmp_path: Path) -> None:
    api = FakeSliceApi([slices()], [])
    with pytest.raises(InvalidArgument, match="namespace"):
        KubernetesDiscovery("", api=api)
    with pytest.raises(InvalidArgument, match="not both"):
        KubernetesDiscovery(NAMESPACE, api=api, kubeconfig="/etc/kubeconfig")
    missing = tmp_path / "no-such-kubeconfig"
    with pytest.raises(InvalidArgument, match=f"cannot use the kubeconfig {missing}"):
        KubernetesDiscovery(NAMESPACE, kubeconfig=str(missing))


# -- the real SliceApi, against a loopback server that answers as the API server ----------

SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


class ApiServer:
    """Answers GET on SLICES_PATH: lists from `pages` in turn, watches with `watch_events`
    as a chunked stream of JSON lines, then holds the stream open until `release`."""

    def __init__(self) -> None:
        self.pages: deque[tuple[int, Json]] = deque()
        self.watch_events: list[Json] = []
        self.hold = True
        self.requests: list[tuple[str, dict[str, str], str | None]] = []
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = dict(parse_qsl(url.query, keep_blank_values=True))
                api.requests.append((url.path, query, self.headers.get("Authorization")))
                if url.path != SLICES_PATH:
                    self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                elif query.get("watch") == "true":
                    self._stream()
                else:
                    self._send(*api.pages.popleft())

            def _send(self, status: int, body: Json) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self) -> None:
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may hang up first
                    for item in api.watch_events:
                        line = json.dumps(item).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    if api.hold:
                        api.release.wait(timeout=30)
                    self.wfile.write(b"0\r\n\r\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def queries(self, watch: bool) -> list[dict[str, str]]:
        return [query for _, query, _ in self.requests if (query.get("watch") == "true") == watch]


@pytest.fixture
def api_server() -> Iterator[ApiServer]:
    server = ApiServer()
    thread = threading.Thread(target=server.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()
    thread.join()


@pytest.fixture
def slice_api(api_server: ApiServer) -> Iterator[KubernetesSliceApi]:
    configuration = client.Configuration(host=api_server.url, no_proxy="127.0.0.1")
    with client.ApiClient(configuration) as api_client:
        yield KubernetesSliceApi(api_client)


def list_body(items: list[Json], version: str, token: str | None = None) -> Json:
    metadata = {"resourceVersion": version, **({"continue": token} if token else {})}
    return {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": metadata, "items": items}  # fmt: skip


def test_the_real_api_lists_every_page_as_the_servers_json(
    api_server: ApiServer, slice_api: KubernetesSliceApi
) -> None:
    empty = slices(endpoint_slice("kapi-node-empty"))[0][0]  # "endpoints": null
    page_one, page_two = slices(NODE_SLICE)[0], [empty]
    api_server.pages.extend([(200, list_body(page_one, "48213", "eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ")),
                             (200, list_body(page_two, "48213"))])  # fmt: skip
    items, version = slice_api.list(NAMESPACE, SELECTOR)
    assert (items, version) == (page_one + page_two, "48213")
    assert items[1]["endpoints"] is None  # as the server wrote it
    first, second = api_server.queries(watch=False)
    assert first == {"labelSelector": SELECTOR, "limit": "500"}
    assert second == {"labelSelector": SELECTOR, "limit": "500",
                      "continue": "eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ"}  # fmt: skip


def test_the_real_api_watches_from_a_version_with_bookmarks(
    api_server: ApiServer, slice_api: KubernetesSliceApi
) -> None:
    api_server.hold = False
    deleted = endpoint_slice("kapi-node-empty", version="48301")
    api_server.watch_events = [
        event("ADDED", NODE_SLICE),
        bookmark("48300"),
        event("DELETED", deleted),
    ]
    events = list(slice_api.watch(NAMESPACE, SELECTOR, "48213", 30))
    assert events == api_server.watch_events
    [query] = api_server.queries(watch=True)
    assert query == {"labelSelector": SELECTOR, "resourceVersion": "48213", "watch": "true",
                     "allowWatchBookmarks": "true", "timeoutSeconds": "30"}  # fmt: skip


def test_the_real_api_turns_410_gone_into_resource_version_expired(
    api_server: ApiServer, slice_api: KubernetesSliceApi
) -> None:
    api_server.hold = False
    api_server.watch_events = [GONE]
    with pytest.raises(ResourceVersionExpired, match="too old resource version"):
        list(slice_api.watch(NAMESPACE, SELECTOR, "1000", 30))
    api_server.pages.append(
        (410, GONE["object"] | {"message": "The provided continue parameter is too old"})
    )
    with pytest.raises(ResourceVersionExpired):
        slice_api.list(NAMESPACE, SELECTOR)


async def test_discovery_through_a_kubeconfig_and_a_real_watch_that_is_interrupted(
    api_server: ApiServer, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "local", "cluster": {"server": api_server.url}}],
        "users": [{"name": "gateway", "user": {"token": "s3cr3t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "local", "user": "gateway"}}],
    }))  # fmt: skip
    api_server.pages.append((200, list_body(slices(NODE_SLICE)[0], "48213")))
    api_server.watch_events = [event("ADDED", B)]  # then the stream stays open
    discovery = KubernetesDiscovery(NAMESPACE, SELECTOR, kubeconfig=str(kubeconfig), timing=FAST)
    task = asyncio.create_task(discovery.run(published := Published()))
    await eventually(lambda: len(published.sets) == 2)
    assert published.addresses()[-1] == {"10.244.1.17:8001", "10.244.1.23:8001", "10.0.1.1:8001"}
    [thread] = [t for t in threading.enumerate() if t.name == discovery.thread_name]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()  # the watch was cut, not waited out: the server holds it
    assert not api_server.release.is_set()
    assert {auth for _, _, auth in api_server.requests} == {"Bearer s3cr3t"}


def test_without_a_kubeconfig_a_pod_uses_its_service_account(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import certifi
    from kubernetes.config import incluster_config

    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.pod-token")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", certifi.where())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    configuration = KubernetesSliceApi.connect()._discovery.api_client.configuration
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.api_key["BearerToken"] == "bearer eyJhbGciOiJSUzI1NiJ9.pod-token"


def test_with_no_configuration_at_all_the_error_says_what_to_give(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubernetes.config import kube_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    with pytest.raises(Unavailable, match=r"not in a pod .* give the kubeconfig's path"):
        KubernetesDiscovery(NAMESPACE, SELECTOR)
