"""Routing policies: each one small module with one choice hook, chosen by name.

A policy sees the backends that may serve a request (healthy, not ejected, with the model's
version loaded, of the preferred hardware) and picks one. It never sees the payload: only
`key`, the value of the route's hashing parameter when the route names one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kapi.gateway.policies.hashing import ConsistentHash
from kapi.gateway.policies.least_outstanding import LeastOutstanding
from kapi.gateway.policies.round_robin import RoundRobin
from kapi.gateway.policies.weighted import Weighted

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Candidate",
    "ConsistentHash",
    "LeastOutstanding",
    "Policy",
    "RoundRobin",
    "Weighted",
    "make_policy",
]


class Candidate(Protocol):
    """What a policy may read about a backend."""

    @property
    def address(self) -> str: ...

    @property
    def outstanding(self) -> int:
        """Requests sent to it and not yet answered."""
        ...

    @property
    def latency_ewma_s(self) -> float:
        """An exponentially weighted moving average of its recent latencies (0: none yet)."""
        ...

    @property
    def weight(self) -> float: ...


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        """One of `candidates` (never empty)."""
        ...


# Each policy's module imports Candidate only for type checking, so these imports, above the
# protocols, are not circular at run time.
POLICIES: dict[str, Callable[[], Policy]] = {
    LeastOutstanding.name: LeastOutstanding,
    RoundRobin.name: RoundRobin,
    Weighted.name: Weighted,
    ConsistentHash.name: ConsistentHash,
}
DEFAULT_POLICY = LeastOutstanding.name


def make_policy(name: str) -> Policy:
    """A new instance of the policy called `name` (a key of POLICIES)."""
    try:
        policy_class = POLICIES[name]
    except KeyError as error:
        # Imported here: kapi.core.errors pulls in grpc, which only this error path needs.
        from kapi.core.errors import InvalidArgument

        known = ", ".join(sorted(POLICIES))
        raise InvalidArgument(f"unknown routing policy {name!r}; known: {known}") from error
    return policy_class()
