"""Routing, per request: the version (an explicit one, else the route's traffic split), the
backends that may take it (healthy, with that version loaded, of the preferred hardware),
and the policy's choice among them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from kapi.core.errors import InvalidArgument, KapiError, NotFound, Unavailable
from kapi.gateway.backends import Backend, BackendPool
from kapi.gateway.policies import DEFAULT_POLICY, Policy, make_policy
from kapi.gateway.routes import Route, check_hardware

# The request parameter that asks for hardware: a class or a profile, or several,
# comma-separated, preferred first ("gpu,edge").
HARDWARE_PARAMETER = "kapi-hardware"


@dataclass
class RouteEntry:
    route: Route
    policy: Policy
    # The split as cumulative weights, for one random draw per request.
    versions: tuple[str, ...] = ()
    cumulative: tuple[float, ...] = ()

    @classmethod
    def of(cls, route: Route) -> RouteEntry:
        total, cumulative = 0.0, []
        for weight in route.split.values():
            total += weight
            cumulative.append(total)
        return cls(route, make_policy(route.policy), tuple(route.split), tuple(cumulative))


@dataclass
class Router:
    pool: BackendPool
    rng: random.Random = field(default_factory=random.Random)
    routes: dict[str, RouteEntry] = field(default_factory=dict)
    default_policy: Policy = field(default_factory=lambda: make_policy(DEFAULT_POLICY))

    def set_route(self, model: str, route: Route) -> None:
        self.routes[model] = RouteEntry.of(route)

    def delete_route(self, model: str) -> bool:
        return self.routes.pop(model, None) is not None

    def replace_routes(self, routes: Mapping[str, Route]) -> None:
        self.routes = {model: RouteEntry.of(route) for model, route in routes.items()}

    def version(self, model: str, requested: str) -> str | None:
        """The version to ask for: the client's, else one drawn from the split (None: the
        backend's own default, as Triton's version policy picks it)."""
        if requested:
            return requested
        entry = self.routes.get(model)
        if entry is None or not entry.versions:
            return None
        draw = self.rng.random() * entry.cumulative[-1]
        for version, bound in zip(entry.versions, entry.cumulative, strict=True):
            if draw < bound:
                return version
        return entry.versions[-1]

    def choose(
        self,
        model: str,
        version: str | None,
        parameters: Mapping[str, object],
        exclude: Collection[Backend] = (),
    ) -> Backend:
        """The backend for one request, or NOT_FOUND (no backend serves the model) or
        UNAVAILABLE (none that serves it can take it now)."""
        entry = self.routes.get(model)
        candidates = self.candidates(model, version, parameters, exclude)
        policy = entry.policy if entry is not None else self.default_policy
        key = None
        if entry is not None and entry.route.hash_parameter is not None:
            value = parameters.get(entry.route.hash_parameter)
            key = None if value is None else str(value)
        chosen = policy.choose(candidates, key)
        assert isinstance(chosen, Backend)
        return chosen

    def can_route(
        self,
        model: str,
        version: str | None,
        parameters: Mapping[str, object],
        exclude: Collection[Backend],
    ) -> bool:
        """Whether some backend other than `exclude` could take the request (for a retry);
        the policy is not asked, so its state does not move."""
        try:
            self.candidates(model, version, parameters, exclude)
        except KapiError:
            return False
        return True

    def candidates(
        self,
        model: str,
        version: str | None,
        parameters: Mapping[str, object],
        exclude: Collection[Backend] = (),
    ) -> list[Backend]:
        """The backends the policy chooses among (never empty: NOT_FOUND or UNAVAILABLE)."""
        serving = [b for b in self.pool if b.serves(model)]
        if not serving:
            raise NotFound(f"model '{model}' is not served by any backend of this gateway")
        # A version no backend has: any backend that serves the model answers, with its own
        # error, as a client talking to it directly would see.
        if version and any(b.serves(model, version) for b in serving):
            serving = [b for b in serving if b.serves(model, version)]
        candidates = _usable(serving, exclude)
        if not candidates:
            what = f"model '{model}'" + (f" version {version}" if version else "")
            raise Unavailable(f"no healthy backend serves {what} now")
        return _preferred(candidates, _preference(self.routes.get(model), parameters))


def _usable(serving: list[Backend], exclude: Collection[Backend]) -> list[Backend]:
    """Healthy and not ejected; when every healthy one is ejected, those (a gateway that
    ejected all of a model's backends would otherwise serve nothing)."""
    now = time.monotonic()
    healthy = [b for b in serving if b.healthy and b not in exclude]
    return [b for b in healthy if not b.ejected(now)] or healthy


def _preference(entry: RouteEntry | None, parameters: Mapping[str, object]) -> list[str]:
    asked = parameters.get(HARDWARE_PARAMETER)
    if asked is None:
        return entry.route.hardware if entry is not None else []
    items = [item.strip() for item in asked.split(",")] if isinstance(asked, str) else []
    items = [item for item in items if item]
    if not items:
        raise InvalidArgument(
            f"request parameter '{HARDWARE_PARAMETER}': expected a string: a hardware class "
            "or profile, or several, comma-separated"
        )
    try:
        return [check_hardware(item) for item in items]
    except ValueError as exc:
        raise InvalidArgument(f"request parameter '{HARDWARE_PARAMETER}': {exc}") from None


def _preferred(candidates: list[Backend], preference: list[str]) -> list[Backend]:
    """The candidates of the first preferred class or profile that has any; all of them
    when none has (the ordered fallback ends with any backend)."""
    for item in preference:
        matching = [b for b in candidates if item == b.hardware or item in b.profiles]
        if matching:
            return matching
    return candidates
