"""Backends from Kubernetes: the EndpointSlices (discovery.k8s.io/v1) of one namespace.

The slices are selected by label, and slices inherit their Service's labels, so a selector
such as `app.kubernetes.io/name=kapi-node` names the Services whose pods are backends. A
slice's port named `port_name` is the OIP gRPC port, the one named `http_port_name` (when it
has one) the REST port; the slice's labels may carry the hardware profile and a weight.

The `kubernetes` client blocks, so the list-then-watch loop runs on a thread of its own and
hands each new set of backends to the event loop. The thread sees the API server's JSON as
it is (camelCase, nulls and all) through `SliceApi`, a seam thin enough for tests to fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kapi.core.errors import InvalidArgument, MissingExtra, Unavailable
from kapi.gateway.discovery import BackendSpec, Publish
from kapi.gateway.discovery.endpointslices import (
    SliceFields,
    SliceTable,
    resource_version,
)

if TYPE_CHECKING:
    from kubernetes import client as k8s_client
    from kubernetes import watch as k8s_watch

log = logging.getLogger(__name__)

Json = dict[str, Any]
LIST_PAGE = 500  # slices per list request; a continue token fetches the rest
STOP_WAIT_S = 5.0  # how long a cancelled run waits for its thread before leaving it


class ResourceVersionExpired(Exception):
    """The API server no longer has the resourceVersion asked for (410 Gone): list again."""


class SliceApi(Protocol):
    """The API server, as the watch loop needs it; objects are its JSON, as plain dicts."""

    def list(self, namespace: str, selector: str) -> tuple[list[Json], str]:
        """Every slice selected, and the list's resourceVersion to watch from."""
        ...

    def watch(
        self, namespace: str, selector: str, resource_version: str, timeout_s: int
    ) -> Generator[Json, None, None]:
        """Events `{"type": ..., "object": ...}` after `resource_version`, until the server
        ends the watch (after about `timeout_s`) or `interrupt` is called. Raises
        ResourceVersionExpired where the server answers 410 Gone."""
        ...

    def interrupt(self) -> None:
        """End the watch in progress soon; called from another thread."""
        ...


@dataclass(frozen=True, slots=True)
class WatchTiming:
    watch_timeout_s: int = 30  # the server ends each watch after this; it is then resumed
    backoff_min_s: float = 0.5  # the pause before a watch resumes, doubled per failure ...
    backoff_max_s: float = 10.0  # ... up to this


class _Follower:
    """List, then watch from the list's resourceVersion and resume from the last one seen;
    list again when the server has forgotten it. Runs on its own thread until `stopping`."""

    def __init__(
        self,
        api: SliceApi,
        namespace: str,
        selector: str,
        table: SliceTable,
        timing: WatchTiming,
        publish: Callable[[frozenset[BackendSpec]], None],
        stopping: threading.Event,
    ) -> None:
        self._api, self._namespace, self._selector = api, namespace, selector
        self._table, self._timing, self._publish, self._stopping = table, timing, publish, stopping
        self._version: str | None = None  # the last resourceVersion seen; None: list first
        self._published: frozenset[BackendSpec] | None = None
        self._delay = timing.backoff_min_s

    def run(self) -> None:
        while not self._stopping.is_set():
            pause = self._timing.backoff_min_s
            try:
                if self._version is None:
                    self._relist()
                self._watch()
            except ResourceVersionExpired as exc:
                log.info("resourceVersion %s expired (%s): listing again", self._version, exc)
                self._version = None
            except Exception as exc:
                if self._stopping.is_set():
                    return
                pause, self._delay = self._delay, min(self._delay * 2, self._timing.backoff_max_s)
                log.warning(
                    "watching EndpointSlices in %s failed, again in %.1f s: %s: %s",
                    self._namespace, pause, type(exc).__name__, exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )  # fmt: skip
            self._stopping.wait(pause)

    def _relist(self) -> None:
        items, version = self._api.list(self._namespace, self._selector)
        self._table.replace(items)
        self._version, self._delay = version, self._timing.backoff_min_s
        self._publish_if_changed()

    def _watch(self) -> None:
        """Follow one watch from the last version seen, to its end or its failure."""
        assert self._version is not None
        timeout_s = self._timing.watch_timeout_s
        events = self._api.watch(self._namespace, self._selector, self._version, timeout_s)
        try:
            for event in events:
                if self._stopping.is_set():
                    break
                self._version = self._apply(event) or self._version
                self._delay = self._timing.backoff_min_s
        finally:
            events.close()

    def _apply(self, event: Mapping[str, Any]) -> str | None:
        kind, item = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # a Status object
            if item.get("code") == 410:
                raise ResourceVersionExpired(item.get("message", ""))
            raise RuntimeError(f"the watch failed: {item.get('reason')}: {item.get('message')}")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._table.apply(kind, item)
            self._publish_if_changed()
        return resource_version(item)  # a BOOKMARK carries only this

    def _publish_if_changed(self) -> None:
        backends = self._table.backends()
        if backends != self._published:
            self._published = backends
            self._publish(backends)


class KubernetesDiscovery:
    """The ready endpoints of the EndpointSlices in `namespace` that match `label_selector`.

    `api` is the API server (tests pass a fake); without it, the client is configured from
    `kubeconfig` when given, else from the pod's service account, else from the default
    kubeconfig ($KUBECONFIG or ~/.kube/config)."""

    name = "kubernetes"

    def __init__(
        self,
        namespace: str,
        label_selector: str = "",
        *,
        port_name: str = "grpc",
        http_port_name: str | None = "http",
        profile_label: str = "kapi.dev/profile",
        weight_label: str = "kapi.dev/weight",
        api: SliceApi | None = None,
        kubeconfig: str | None = None,
        timing: WatchTiming | None = None,
    ) -> None:
        if not namespace:
            raise InvalidArgument("Kubernetes discovery needs the namespace of the slices")
        if not port_name:
            raise InvalidArgument("Kubernetes discovery needs the name of the gRPC port")
        if api is not None and kubeconfig is not None:
            raise InvalidArgument("give Kubernetes discovery an api or a kubeconfig, not both")
        self.namespace, self.label_selector = namespace, label_selector
        self.fields = SliceFields(port_name, http_port_name, profile_label, weight_label)
        self.timing = timing or WatchTiming()
        self._api = api if api is not None else KubernetesSliceApi.connect(kubeconfig)

    @property
    def thread_name(self) -> str:
        return f"kapi-discovery-kubernetes-{self.namespace}"

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        stopping = threading.Event()
        exited: asyncio.Future[None] = loop.create_future()

        def deliver(backends: frozenset[BackendSpec]) -> None:
            if not stopping.is_set():  # nothing reaches the gateway once `run` is over
                publish(backends)

        def hand_over(backends: frozenset[BackendSpec]) -> None:  # on the thread
            loop.call_soon_threadsafe(deliver, backends)

        table = SliceTable(self.fields)
        follower = _Follower(
            self._api, self.namespace, self.label_selector, table, self.timing, hand_over, stopping
        )

        def follow() -> None:
            try:
                follower.run()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, exited)

        threading.Thread(target=follow, name=self.thread_name, daemon=True).start()
        try:
            await asyncio.shield(exited)
        finally:
            stopping.set()
            await self._wait_for(exited)

    async def _wait_for(self, exited: asyncio.Future[None]) -> None:
        deadline = asyncio.get_running_loop().time() + STOP_WAIT_S
        while not exited.done() and asyncio.get_running_loop().time() < deadline:
            self._api.interrupt()  # again and again: a watch may start between two tries
            await asyncio.wait([exited], timeout=0.1)
        if not exited.done():
            log.warning("the thread %s did not stop; it ends with the process", self.thread_name)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class KubernetesSliceApi(SliceApi):
    """`SliceApi` over the official client, reading the JSON as the server sends it rather
    than the client's models: the translation follows the API's documentation, and no
    client-side validation stands between (older clients raised on a slice with
    `"endpoints": null`, kubernetes-client/python#2214)."""

    def __init__(self, api_client: k8s_client.ApiClient) -> None:
        from kubernetes import client

        self._discovery = client.DiscoveryV1Api(api_client)
        self._watch: k8s_watch.Watch | None = None

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> KubernetesSliceApi:
        try:
            from kubernetes import client
        except ImportError as exc:  # pragma: no cover - the client is there wherever tests run
            raise MissingExtra("kubernetes", "gateway") from exc
        configuration = client.Configuration()
        _load_configuration(configuration, kubeconfig)
        return cls(client.ApiClient(configuration))

    def list(self, namespace: str, selector: str) -> tuple[list[Json], str]:
        items: list[Json] = []
        token: str | None = None
        while True:
            page = self._call(self._discovery.list_namespaced_endpoint_slice, namespace,
                label_selector=selector or None, limit=LIST_PAGE, _continue=token,
                _preload_content=False, _request_timeout=(10, 60),
            )  # fmt: skip
            try:
                body = json.loads(page.data)
            finally:
                page.release_conn()
            items.extend(body.get("items") or [])
            token = (body.get("metadata") or {}).get("continue") or None
            if token is None:
                return items, body["metadata"]["resourceVersion"]

    def watch(
        self, namespace: str, selector: str, resource_version: str, timeout_s: int
    ) -> Generator[Json, None, None]:
        from kubernetes import watch

        # "object": no model, so an event's object is the server's JSON, as from `list`.
        self._watch = watcher = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
        stream = watcher.stream(  # type: ignore[no-untyped-call]
            self._discovery.list_namespaced_endpoint_slice, namespace,
            label_selector=selector or None, resource_version=resource_version,
            allow_watch_bookmarks=True, timeout_seconds=timeout_s,
            # a connection that goes quiet for longer than the server's own end is dead
            _request_timeout=(10, timeout_s + 15),
        )  # fmt: skip
        try:
            while True:
                event = self._call(next, stream, None)
                if event is None:
                    return
                yield {"type": event["type"], "object": event["raw_object"]}
        finally:
            stream.close()

    def interrupt(self) -> None:
        watcher = self._watch
        if watcher is not None:
            watcher.stop()  # type: ignore[no-untyped-call]

    @staticmethod
    def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`function`'s answer, with a 410 Gone (an HTTP status, or an ERROR event that the
        client raises) as ResourceVersionExpired."""
        from kubernetes.client.exceptions import ApiException

        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 410:
                raise ResourceVersionExpired(exc.reason or "410 Gone") from exc
            raise


def _load_configuration(configuration: k8s_client.Configuration, kubeconfig: str | None) -> None:
    from kubernetes import config

    if kubeconfig is not None:
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        except (config.ConfigException, OSError) as exc:
            raise InvalidArgument(f"cannot use the kubeconfig {kubeconfig}: {exc}") from exc
        return
    try:  # in a pod: its service account (KUBERNETES_SERVICE_HOST is set)
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return
    except config.ConfigException as in_pod:
        why_not_in_pod = in_pod
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration, persist_config=False
        )
    except (config.ConfigException, OSError) as exc:
        raise Unavailable(
            f"no Kubernetes configuration: not in a pod ({why_not_in_pod}) and no default "
            f"kubeconfig ({exc}); give the kubeconfig's path"
        ) from exc
