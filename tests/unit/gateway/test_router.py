"""Routing over a real BackendPool: the version a request asks for, the backends that may take
it (serving it, healthy, not ejected, of the preferred hardware) and the policy's pick.

Backends are real `Backend` objects whose state is set as the prober would set it. Their
gRPC channels are created by `BackendPool.publish` and need no running event loop (these
tests are synchronous for that reason); the fixture closes them.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping

import pytest
import pytest_asyncio
from kapi.core.errors import InvalidArgument, NotFound, Unavailable
from kapi.gateway.backends import Backend, BackendPool
from kapi.gateway.discovery import BackendSpec
from kapi.gateway.policies import RoundRobin
from kapi.gateway.router import HARDWARE_PARAMETER, Router
from kapi.gateway.routes import Route

DRAWS = 20_000
# Round robin over n candidates visits each of them in any n consecutive picks; a few
# rounds over the largest set here show every backend that may be picked.
PICKS = 24


@pytest_asyncio.fixture(loop_scope="function")
async def pool() -> AsyncIterator[BackendPool]:
    pool = BackendPool(channels=2, max_message_bytes=1 << 20)
    yield pool
    await pool.close()


def add(
    pool: BackendPool,
    address: str,
    models: Mapping[str, set[str]],
    *,
    profile: str | None = None,
    reported: tuple[str, ...] = (),
    healthy: bool = True,
) -> Backend:
    """A backend as the prober leaves it once it has answered."""
    specs = [backend.spec for backend in pool]
    pool.publish("test", [*specs, BackendSpec(address, profile)])
    backend = pool.backends[address]
    backend.healthy = healthy
    backend.stale = False
    backend.models = {name: frozenset(versions) for name, versions in models.items()}
    backend.reported_profiles = reported
    return backend


def router_over(pool: BackendPool, routes: Mapping[str, Route] | None = None) -> Router:
    """A router whose default policy is round robin, so that `picked` sees every candidate."""
    router = Router(pool, rng=random.Random(5), default_policy=RoundRobin())
    router.replace_routes(routes or {})
    return router


def picked(
    router: Router,
    model: str,
    version: str | None = None,
    parameters: Mapping[str, object] | None = None,
    picks: int = PICKS,
) -> set[str]:
    return {router.choose(model, version, parameters or {}).address for _ in range(picks)}


def eject(backend: Backend) -> None:
    backend.ejected_until = time.monotonic() + 600.0


def test_channels_are_created_without_a_running_event_loop(pool: BackendPool) -> None:
    backend = add(pool, "10.0.0.1:8001", {"m": {"1"}})

    assert backend.channel() is not None
    assert backend.unary("ModelInfer") is not backend.unary("ModelInfer")  # two channels


# Versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split",
    [{"3": 90.0, "4": 10.0}, {"1": 1.0, "2": 2.0, "7": 7.0}, {"5": 0.5, "6": 0.5}],
)
def test_split_draws_give_each_version_its_share(
    pool: BackendPool, split: dict[str, float]
) -> None:
    router = router_over(pool, {"m": Route(split=split)})
    router.rng = random.Random(2024)

    counts = Counter(router.version("m", "") for _ in range(DRAWS))

    total = sum(split.values())
    assert set(counts) == set(split)
    for version, weight in split.items():
        share = weight / total
        tolerance = 4.0 * math.sqrt(DRAWS * share * (1.0 - share))
        assert abs(counts[version] - DRAWS * share) <= tolerance, (version, counts)


def test_a_split_with_one_version_always_gives_it(pool: BackendPool) -> None:
    router = router_over(pool, {"m": Route(split={"8": 1.0})})

    assert {router.version("m", "") for _ in range(100)} == {"8"}


def test_an_explicit_version_wins_over_the_split(pool: BackendPool) -> None:
    router = router_over(pool, {"m": Route(split={"3": 50.0, "4": 50.0})})

    assert {router.version("m", "9") for _ in range(100)} == {"9"}


def test_no_route_or_no_split_leaves_the_version_to_the_backend(pool: BackendPool) -> None:
    router = router_over(pool, {"routed": Route(hardware=["gpu"])})

    assert router.version("unrouted", "") is None
    assert router.version("routed", "") is None


def test_the_same_seed_draws_the_same_versions(pool: BackendPool) -> None:
    routes = {"m": Route(split={"1": 1.0, "2": 1.0, "3": 1.0})}
    first, second = router_over(pool, routes), router_over(pool, routes)
    first.rng, second.rng = random.Random(3), random.Random(3)

    draws = [first.version("m", "") for _ in range(200)]

    assert draws == [second.version("m", "") for _ in range(200)]


# Which backends may serve -----------------------------------------------------------------


def test_a_model_no_backend_serves_is_not_found_and_named(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"other": {"1"}})
    router = router_over(pool)

    with pytest.raises(NotFound, match="'fashion'"):
        router.choose("fashion", None, {})


def test_an_empty_pool_serves_nothing(pool: BackendPool) -> None:
    with pytest.raises(NotFound, match="'fashion'"):
        router_over(pool).choose("fashion", "1", {})


def test_a_model_served_only_by_unhealthy_backends_is_unavailable(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"m": {"1"}}, healthy=False)
    add(pool, "10.0.0.2:8001", {"m": {"1"}}, healthy=False)
    add(pool, "10.0.0.3:8001", {"other": {"1"}})
    router = router_over(pool)

    with pytest.raises(Unavailable, match="'m' version 2"):
        router.choose("m", "2", {})
    with pytest.raises(Unavailable, match="'m'"):
        router.choose("m", None, {})


def test_unhealthy_backends_are_never_picked(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"m": {"1"}})
    add(pool, "10.0.0.2:8001", {"m": {"1"}}, healthy=False)

    assert picked(router_over(pool), "m") == {"10.0.0.1:8001"}


def test_excluded_backends_are_not_picked_and_excluding_all_is_unavailable(
    pool: BackendPool,
) -> None:
    first = add(pool, "10.0.0.1:8001", {"m": {"1"}})
    second = add(pool, "10.0.0.2:8001", {"m": {"1"}})
    router = router_over(pool)

    assert {router.choose("m", None, {}, exclude=[first]).address for _ in range(8)} == {
        second.address
    }
    with pytest.raises(Unavailable):
        router.choose("m", None, {}, exclude=[first, second])


def test_ejected_backends_are_skipped_while_a_healthy_one_is_not_ejected(
    pool: BackendPool,
) -> None:
    ejected = add(pool, "10.0.0.1:8001", {"m": {"1"}})
    add(pool, "10.0.0.2:8001", {"m": {"1"}})
    eject(ejected)

    assert picked(router_over(pool), "m") == {"10.0.0.2:8001"}


def test_ejected_backends_are_used_when_every_healthy_one_is_ejected(pool: BackendPool) -> None:
    for address in ("10.0.0.1:8001", "10.0.0.2:8001"):
        eject(add(pool, address, {"m": {"1"}}))
    add(pool, "10.0.0.3:8001", {"m": {"1"}}, healthy=False)

    assert picked(router_over(pool), "m") == {"10.0.0.1:8001", "10.0.0.2:8001"}


def test_an_ejection_that_ended_counts_no_more(pool: BackendPool) -> None:
    backend = add(pool, "10.0.0.1:8001", {"m": {"1"}})
    add(pool, "10.0.0.2:8001", {"m": {"1"}})
    backend.ejected_until = time.monotonic() - 1.0

    assert picked(router_over(pool), "m") == {"10.0.0.1:8001", "10.0.0.2:8001"}


def test_a_version_some_backend_has_narrows_the_candidates(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"m": {"1", "2"}})
    add(pool, "10.0.0.2:8001", {"m": {"1"}})
    add(pool, "10.0.0.3:8001", {"m": {"2"}, "other": {"1"}})
    router = router_over(pool)

    assert picked(router, "m", "2") == {"10.0.0.1:8001", "10.0.0.3:8001"}
    assert picked(router, "m", "1") == {"10.0.0.1:8001", "10.0.0.2:8001"}


def test_a_version_no_backend_has_goes_to_any_that_serves_the_model(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"m": {"1"}})
    add(pool, "10.0.0.2:8001", {"m": {"2"}})
    add(pool, "10.0.0.3:8001", {"other": {"5"}})

    assert picked(router_over(pool), "m", "5") == {"10.0.0.1:8001", "10.0.0.2:8001"}


def test_a_version_held_only_by_an_unhealthy_backend_is_unavailable(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"m": {"1"}})
    add(pool, "10.0.0.2:8001", {"m": {"2"}}, healthy=False)

    with pytest.raises(Unavailable, match="version 2"):
        router_over(pool).choose("m", "2", {})


def test_the_split_version_narrows_the_candidates(pool: BackendPool) -> None:
    add(pool, "10.0.0.1:8001", {"m": {"3"}})
    add(pool, "10.0.0.2:8001", {"m": {"4"}})
    router = router_over(pool, {"m": Route(split={"3": 1.0, "4": 1.0}, policy="round-robin")})

    for _ in range(200):
        version = router.version("m", "")
        assert version is not None
        backend = router.choose("m", version, {})
        assert backend.serves("m", version)


# Hardware ---------------------------------------------------------------------------------


@pytest.fixture
def fleet(pool: BackendPool) -> BackendPool:
    """One backend of each hardware class, one of them a second GPU generation."""
    add(pool, "gpu-a:8001", {"m": {"1"}}, profile="nvidia-sm90")
    add(pool, "gpu-b:8001", {"m": {"1"}}, profile="cpu-x86_64", reported=("nvidia-sm80",))
    add(pool, "edge:8001", {"m": {"1"}}, profile="rpi5")
    add(pool, "cpu:8001", {"m": {"1"}}, profile="cpu-x86_64-avx2")
    return pool


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("gpu", {"gpu-a:8001", "gpu-b:8001"}),
        ("edge", {"edge:8001"}),
        ("cpu", {"cpu:8001"}),
        ("nvidia-sm80", {"gpu-b:8001"}),  # its own report wins over the discovery source's
        ("rpi5", {"edge:8001"}),
        ("nvidia-sm75,edge", {"edge:8001"}),  # no sm75: the next preference
        (" nvidia-sm75 , rpi5 ", {"edge:8001"}),
        ("edge,gpu", {"edge:8001"}),
        ("nvidia-sm75", {"gpu-a:8001", "gpu-b:8001", "edge:8001", "cpu:8001"}),  # then any
        ("jetson-orin,intel-npu", {"gpu-a:8001", "gpu-b:8001", "edge:8001", "cpu:8001"}),
    ],
)
def test_the_hardware_parameter_prefers_a_class_or_a_profile_in_order(
    fleet: BackendPool, asked: str, expected: set[str]
) -> None:
    router = router_over(fleet)

    assert picked(router, "m", None, {HARDWARE_PARAMETER: asked}) == expected


def test_the_discovery_profile_stands_in_only_without_a_reported_one(fleet: BackendPool) -> None:
    router = router_over(fleet)

    # gpu-b was discovered as cpu-x86_64 but reports nvidia-sm80: nothing is cpu-x86_64 now,
    # so the next preference decides.
    assert picked(router, "m", None, {HARDWARE_PARAMETER: "cpu-x86_64,edge"}) == {"edge:8001"}


def test_the_routes_hardware_is_the_preference_when_the_request_names_none(
    fleet: BackendPool,
) -> None:
    routes = {"m": Route(hardware=["nvidia-sm75", "edge", "gpu"], policy="round-robin")}
    router = router_over(fleet, routes)

    assert picked(router, "m") == {"edge:8001"}
    # The request's own preference overrides the route's.
    assert picked(router, "m", None, {HARDWARE_PARAMETER: "cpu"}) == {"cpu:8001"}


def test_hardware_preference_falls_back_past_unhealthy_and_ejected_backends(
    fleet: BackendPool,
) -> None:
    fleet.backends["edge:8001"].healthy = False
    eject(fleet.backends["cpu:8001"])
    router = router_over(fleet)

    assert picked(router, "m", None, {HARDWARE_PARAMETER: "edge,cpu,gpu"}) == {
        "gpu-a:8001",
        "gpu-b:8001",
    }


@pytest.mark.parametrize("bad", ["tpu", "gpu,quantum", "", " , ", 3, True])
def test_a_bad_hardware_parameter_is_invalid_argument(fleet: BackendPool, bad: object) -> None:
    router = router_over(fleet)

    with pytest.raises(InvalidArgument, match=HARDWARE_PARAMETER):
        router.choose("m", None, {HARDWARE_PARAMETER: bad})


def test_the_hardware_parameter_is_checked_only_for_a_served_model(fleet: BackendPool) -> None:
    with pytest.raises(NotFound):
        router_over(fleet).choose("absent", None, {HARDWARE_PARAMETER: "tpu"})


# Policies ---------------------------------------------------------------------------------


def test_consistent_hashing_keeps_a_key_on_one_backend(pool: BackendPool) -> None:
    for index in range(5):
        add(pool, f"10.0.0.{index}:8001", {"m": {"1"}})
    add(pool, "10.0.0.9:8001", {"other": {"1"}})
    routes = {"m": Route(policy="consistent-hash", hash_parameter="session")}
    router = router_over(pool, routes)

    homes = {}
    for key in (f"user-{index}" for index in range(200)):
        chosen = {
            router.choose("m", None, {"session": key, "noise": attempt}).address
            for attempt in range(10)
        }
        assert len(chosen) == 1, key
        homes[key] = chosen.pop()

    assert set(homes.values()) == {f"10.0.0.{index}:8001" for index in range(5)}
    # The same key lands on the same backend through a second router (another gateway).
    other = router_over(pool, routes)
    assert all(other.choose("m", None, {"session": k}).address == h for k, h in homes.items())


def test_consistent_hashing_moves_only_the_keys_of_an_ejected_backend(pool: BackendPool) -> None:
    backends = [add(pool, f"10.0.0.{index}:8001", {"m": {"1"}}) for index in range(4)]
    router = router_over(pool, {"m": Route(policy="consistent-hash", hash_parameter="s")})
    keys = [f"k{index}" for index in range(300)]
    before = {key: router.choose("m", None, {"s": key}) for key in keys}

    eject(backends[0])
    after = {key: router.choose("m", None, {"s": key}) for key in keys}

    for key in keys:
        assert after[key] is not backends[0]
        if before[key] is not backends[0]:
            assert after[key] is before[key]


def test_a_route_without_a_policy_uses_least_outstanding(pool: BackendPool) -> None:
    busy = add(pool, "10.0.0.1:8001", {"m": {"1"}})
    idle = add(pool, "10.0.0.2:8001", {"m": {"1"}})
    busy.outstanding = 50
    router = router_over(pool, {"m": Route(split={"1": 1.0})})

    assert {router.choose("m", None, {}) for _ in range(100)} == {idle}


def test_routes_can_be_set_replaced_and_deleted(pool: BackendPool) -> None:
    router = router_over(pool)
    router.set_route("m", Route(split={"2": 1.0}))
    assert router.version("m", "") == "2"

    router.replace_routes({"n": Route(split={"3": 1.0})})
    assert router.version("m", "") is None
    assert router.version("n", "") == "3"

    assert router.delete_route("n") is True
    assert router.delete_route("n") is False
    assert router.version("n", "") is None
