"""EndpointSlices (discovery.k8s.io/v1, as the API server's JSON) to backends: which
endpoints count (ready and not terminating), which port is gRPC and which REST, and the
profile and weight from the slice's labels. Pure functions and one table of the current
slices; the list-and-watch loop that feeds them is kubernetes.py."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kapi.gateway.discovery import BackendSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SliceFields:
    """Where in a slice the backends' ports, profile and weight are found."""

    port_name: str = "grpc"
    http_port_name: str | None = "http"
    profile_label: str = "kapi.dev/profile"
    weight_label: str = "kapi.dev/weight"


def slice_key(item: Mapping[str, Any]) -> str:
    metadata = item.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def resource_version(item: Mapping[str, Any]) -> str | None:
    return (item.get("metadata") or {}).get("resourceVersion") or None


def is_ready(endpoint: Mapping[str, Any]) -> bool:
    """Ready and not terminating. The API documents a missing `ready` as an unknown state
    that "in most cases consumers should interpret ... as ready", and a missing
    `terminating` as not terminating; `ready` may be true for a terminating endpoint where
    the Service publishes not-ready addresses, which must not get new requests either."""
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def host_port(host: str, port: int, address_type: str) -> str:
    return f"[{host}]:{port}" if address_type == "IPv6" else f"{host}:{port}"


def slice_backends(
    item: Mapping[str, Any], fields: SliceFields
) -> tuple[list[BackendSpec], list[str]]:
    """The backends one EndpointSlice names, and what is wrong with it (for the log)."""
    address_type = item.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        return [], [f"addressType {address_type!r} is not IPv4, IPv6 or FQDN"]
    ports = _tcp_ports(item)
    grpc_port = ports.get(fields.port_name)
    if grpc_port is None:
        return [], [f"no TCP port named {fields.port_name!r} (its ports: {sorted(ports)})"]
    http_port = ports.get(fields.http_port_name) if fields.http_port_name is not None else None
    labels: dict[str, str] = dict((item.get("metadata") or {}).get("labels") or {})
    weight, problems = _weight(labels, fields.weight_label)
    backends = []
    for endpoint in item.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses or not is_ready(endpoint):
            continue
        host = addresses[0]  # as kube-proxy: no meaning is defined for any address after it
        backends.append(
            BackendSpec(
                address=host_port(host, grpc_port, address_type),
                profile=labels.get(fields.profile_label) or None,
                http_address=host_port(host, http_port, address_type) if http_port else None,
                weight=weight,
                labels=labels,
            )
        )
    return backends, problems


def _tcp_ports(item: Mapping[str, Any]) -> dict[str, int]:
    ports = {}
    for port in item.get("ports") or []:
        number, protocol = port.get("port"), port.get("protocol") or "TCP"
        if isinstance(number, int) and protocol == "TCP":
            ports[port.get("name") or ""] = number
    return ports


def _weight(labels: Mapping[str, str], key: str) -> tuple[float, list[str]]:
    text = labels.get(key)
    if text is None:
        return 1.0, []
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        return 1.0, [f"label {key}={text!r} is not a positive number: weight 1 instead"]
    return weight, []


class SliceTable:
    """The slices seen so far, by namespace/name, each with its backends. A slice's problems
    are logged when they first appear, not on every change to it."""

    def __init__(self, fields: SliceFields) -> None:
        self._fields = fields
        self._backends: dict[str, list[BackendSpec]] = {}
        self._problems: dict[str, set[str]] = {}

    def replace(self, items: Iterable[Mapping[str, Any]]) -> None:
        self._backends.clear()
        for item in items:
            self._put(item)
        self._problems = {key: self._problems[key] for key in self._backends}

    def apply(self, kind: str, item: Mapping[str, Any]) -> None:
        if kind == "DELETED":
            self._backends.pop(slice_key(item), None)
            self._problems.pop(slice_key(item), None)
        else:
            self._put(item)

    def backends(self) -> frozenset[BackendSpec]:
        """One backend per address: an endpoint moving between slices is in both a while."""
        by_address: dict[str, BackendSpec] = {}
        for key in sorted(self._backends):
            for backend in self._backends[key]:
                by_address.setdefault(backend.address, backend)
        return frozenset(by_address.values())

    def _put(self, item: Mapping[str, Any]) -> None:
        key = slice_key(item)
        self._backends[key], problems = slice_backends(item, self._fields)
        for problem in sorted(set(problems) - self._problems.get(key, set())):
            log.warning("EndpointSlice %s: %s", key, problem, extra={"slice": key})
        self._problems[key] = set(problems)
