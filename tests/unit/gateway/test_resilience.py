"""What keeps the gateway up when backends are not: the retry budget, ejection after failures
and for latency, registration leases, a backend's fading latency average, and the pool's
union of discovery sources.

Time is a fake clock put in place of the `time` module of the module under test, so that
only that module's clock moves (the event loop's stays real).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Collection, Mapping

import grpc
import pytest
import pytest_asyncio
from kapi.gateway import backends, health, retry
from kapi.gateway.backends import EWMA_ALPHA, EWMA_FADE_S, Backend, BackendPool
from kapi.gateway.discovery import BackendSpec, registration
from kapi.gateway.discovery.registration import MAX_LEASE_S, RegistrationDiscovery
from kapi.gateway.health import Ejection, Prober
from kapi.gateway.metrics import GatewayMetrics
from kapi.gateway.retry import RetryBudget
from prometheus_client import CollectorRegistry


class Clock:
    """Stands in for a module's `time`: monotonic() is whatever the test set."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def clock_in(monkeypatch: pytest.MonkeyPatch, *modules: object) -> Clock:
    clock = Clock()
    for module in modules:
        monkeypatch.setattr(module, "time", clock)
    return clock


@pytest_asyncio.fixture(loop_scope="function")
async def pool() -> AsyncIterator[BackendPool]:
    pool = BackendPool(channels=1, max_message_bytes=1 << 20)
    yield pool
    await pool.close()


def add(pool: BackendPool, address: str, latencies: Mapping[str, float] | None = None) -> Backend:
    """A healthy backend whose per-model latency averages are `latencies`."""
    pool.publish("test", [*(b.spec for b in pool), BackendSpec(address)])
    backend = pool.backends[address]
    backend.healthy = True
    backend.models = {model: frozenset({"1"}) for model in latencies or {}}
    backend.model_latency_s = dict(latencies or {})
    # Enough requests behind each average for it to be judged.
    backend.model_samples = dict.fromkeys(latencies or {}, Ejection().latency_samples)
    return backend


class Probing:
    """A Prober and the registry its metrics go to."""

    def __init__(self, pool: BackendPool, ejection: Ejection) -> None:
        self.registry = CollectorRegistry()
        self.prober = Prober(pool, GatewayMetrics(self.registry), ejection)

    def ejections(self, backend: Backend, reason: str) -> float:
        value = self.registry.get_sample_value(
            "kapi_gateway_ejections_total", {"backend": backend.address, "reason": reason}
        )
        return value or 0.0


# The retry budget -------------------------------------------------------------------------


def withdrawals(budget: RetryBudget, attempts: int = 1_000) -> int:
    return sum(budget.withdraw() for _ in range(attempts))


def test_a_new_budget_holds_its_cap_of_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.2, floor_per_s=0.0, cap=7.0)

    assert withdrawals(budget) == 7


def test_each_request_deposits_its_ratio_of_a_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.25, floor_per_s=0.0, cap=1.0)
    assert withdrawals(budget) == 1

    for _ in range(3):
        budget.deposit()
    assert budget.withdraw() is False  # three quarters of a retry is none
    budget.deposit()
    assert budget.withdraw() is True
    assert budget.withdraw() is False


def test_retries_under_failure_everywhere_stay_within_the_ratio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.25, floor_per_s=0.0, cap=4.0)
    assert withdrawals(budget) == 4

    retried = 0
    for _ in range(1_000):  # every request fails and asks to be retried
        budget.deposit()
        retried += budget.withdraw()

    assert retried == 250  # a quarter of the requests


def test_deposits_never_fill_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.5, floor_per_s=0.0, cap=3.0)

    for _ in range(1_000):
        budget.deposit()

    assert withdrawals(budget) == 3


def test_the_floor_refills_the_budget_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.0, floor_per_s=4.0, cap=10.0)
    assert withdrawals(budget) == 10

    clock.advance(0.125)
    assert budget.withdraw() is False  # half a retry so far
    clock.advance(0.125)
    assert budget.withdraw() is True  # the halves add up across withdrawals
    assert budget.withdraw() is False
    clock.advance(1.0)
    assert withdrawals(budget) == 4


def test_the_floor_refills_no_further_than_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.2, floor_per_s=10.0, cap=5.0)
    assert withdrawals(budget) == 5

    clock.advance(3_600.0)

    assert withdrawals(budget) == 5


def test_deposits_and_the_floor_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, retry)
    budget = RetryBudget(ratio=0.5, floor_per_s=2.0, cap=10.0)
    assert withdrawals(budget) == 10

    budget.deposit()
    clock.advance(0.25)

    assert withdrawals(budget) == 1


# Ejection after failures ------------------------------------------------------------------


def fail(probing: Probing, backend: Backend, times: int) -> None:
    for _ in range(times):
        probing.prober.failed(backend, "INTERNAL: boom")


def test_a_backend_is_ejected_after_n_consecutive_failures(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backend = add(pool, "10.0.0.1:8001")
    probing = Probing(pool, Ejection(consecutive_failures=3, base_s=2.0, max_s=60.0))

    fail(probing, backend, 2)
    assert not backend.ejected(clock.now)
    fail(probing, backend, 1)

    assert backend.ejected(clock.now)
    assert backend.ejected_until == clock.now + 2.0
    assert (backend.failures, backend.consecutive_failures, backend.ejections) == (3, 0, 1)
    assert probing.ejections(backend, "failures") == 1.0
    assert not backend.ejected(clock.now + 2.0)


def test_a_success_between_failures_starts_the_count_again(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backend = add(pool, "10.0.0.1:8001")
    probing = Probing(pool, Ejection(consecutive_failures=3))

    for _ in range(5):
        fail(probing, backend, 2)
        backend.observe("m", 0.01)

    assert not backend.ejected(clock.now)
    assert backend.failures == 10
    assert probing.ejections(backend, "failures") == 0.0


def test_ejections_grow_longer_each_time_up_to_max_s(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backend = add(pool, "10.0.0.1:8001")
    probing = Probing(pool, Ejection(consecutive_failures=2, base_s=1.5, max_s=20.0))

    lengths = []
    for _ in range(7):
        fail(probing, backend, 2)
        lengths.append(backend.ejected_until - clock.now)
        clock.now = backend.ejected_until  # it comes back, and fails again

    assert lengths == [1.5, 3.0, 6.0, 12.0, 20.0, 20.0, 20.0]
    assert probing.ejections(backend, "failures") == 7.0


def test_failures_while_ejected_do_not_lengthen_the_ejection(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backend = add(pool, "10.0.0.1:8001")
    probing = Probing(pool, Ejection(consecutive_failures=2, base_s=4.0))
    fail(probing, backend, 2)
    until = backend.ejected_until

    clock.advance(1.0)
    fail(probing, backend, 6)

    assert backend.ejected_until == until
    assert backend.ejections == 1
    assert probing.ejections(backend, "failures") == 1.0


def test_a_backend_ejected_a_thousand_times_is_still_ejected_for_max_s(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backend = add(pool, "10.0.0.1:8001")
    probing = Probing(pool, Ejection(consecutive_failures=1, base_s=2.0, max_s=60.0))

    # A backend that keeps failing is out 60 s at a time: 1,100 ejections is under a day.
    for _ in range(1_100):
        fail(probing, backend, 1)
        assert backend.ejected_until - clock.now <= 60.0
        clock.now = backend.ejected_until

    assert backend.ejections == 1_100


# Ejection for latency ---------------------------------------------------------------------


def test_a_cold_start_is_not_judged_until_enough_requests_are_seen(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    # A Triton python backend's first request took 21 ms against its peers' 1 ms.
    clock = clock_in(monkeypatch, health)
    add(pool, "fast:1", {"m": 0.001})
    add(pool, "steady:1", {"m": 0.001})
    cold = add(pool, "cold:1", {"m": 0.021})
    cold.model_samples["m"] = Ejection().latency_samples - 1
    probing = Probing(pool, Ejection())

    probing.prober.eject_latency_outliers()
    assert not cold.ejected(clock.now)

    cold.model_samples["m"] += 1
    probing.prober.eject_latency_outliers()
    assert cold.ejected(clock.now)


def test_a_latency_outlier_among_three_is_ejected(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    fast = add(pool, "fast:1", {"m": 0.010})
    steady = add(pool, "steady:1", {"m": 0.012})
    slow = add(pool, "slow:1", {"m": 0.500})
    probing = Probing(pool, Ejection(latency_factor=10.0, latency_floor_s=0.005, base_s=2.0))

    probing.prober.eject_latency_outliers()

    assert slow.ejected(clock.now)
    assert not fast.ejected(clock.now)
    assert not steady.ejected(clock.now)
    assert probing.ejections(slow, "latency") == 1.0
    assert "m" not in slow.model_latency_s  # it starts over when it comes back
    assert fast.model_latency_s == {"m": 0.010}


def test_two_backends_are_never_compared(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backends_ = [add(pool, "fast:1", {"m": 0.01}), add(pool, "slow:1", {"m": 5.0})]
    probing = Probing(pool, Ejection())

    probing.prober.eject_latency_outliers()

    assert not any(b.ejected(clock.now) for b in backends_)


def test_backends_serving_different_models_are_never_compared(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    backends_ = [
        add(pool, "big:1", {"large-model": 2.0, "small": 0.010}),
        add(pool, "a:1", {"small": 0.010}),
        add(pool, "b:1", {"small": 0.011}),
        add(pool, "c:1", {"other": 0.001}),
        add(pool, "d:1", {"large-model": 1.9}),
    ]
    probing = Probing(pool, Ejection(latency_factor=10.0, latency_floor_s=0.005))

    probing.prober.eject_latency_outliers()

    assert not any(b.ejected(clock.now) for b in backends_)


def test_an_outlier_is_judged_per_model(monkeypatch: pytest.MonkeyPatch, pool: BackendPool) -> None:
    clock = clock_in(monkeypatch, health)
    odd = add(pool, "odd:1", {"x": 0.010, "y": 1.0})
    others = [add(pool, f"peer-{i}:1", {"x": 0.5, "y": 0.010}) for i in range(3)]
    probing = Probing(pool, Ejection(latency_factor=10.0, latency_floor_s=0.005))

    probing.prober.eject_latency_outliers()

    assert odd.ejected(clock.now)  # slow on y; being fast on x does not excuse it
    assert odd.model_latency_s == {"x": 0.010}
    assert not any(b.ejected(clock.now) for b in others)


def test_the_latency_floor_spares_backends_that_are_fast_anyway(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    add(pool, "a:1", {"m": 0.0001})
    add(pool, "b:1", {"m": 0.0001})
    tiny = add(pool, "tiny:1", {"m": 0.004})  # 40 times its peers, under the floor
    probing = Probing(pool, Ejection(latency_factor=10.0, latency_floor_s=0.005))

    probing.prober.eject_latency_outliers()
    assert not tiny.ejected(clock.now)

    tiny.model_latency_s["m"] = 0.006
    probing.prober.eject_latency_outliers()
    assert tiny.ejected(clock.now)


def test_exactly_factor_times_the_median_is_not_an_outlier(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    add(pool, "a:1", {"m": 0.0625})
    add(pool, "b:1", {"m": 0.0625})
    add(pool, "c:1", {"m": 0.125})
    edge = add(pool, "edge:1", {"m": 0.25})
    probing = Probing(pool, Ejection(latency_factor=4.0, latency_floor_s=0.0))

    probing.prober.eject_latency_outliers()
    assert not edge.ejected(clock.now)

    edge.model_latency_s["m"] = 0.2501
    probing.prober.eject_latency_outliers()
    assert edge.ejected(clock.now)


def test_unhealthy_and_ejected_backends_are_not_peers(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, health)
    add(pool, "fast:1", {"m": 0.01})
    add(pool, "down:1", {"m": 0.01}).healthy = False
    add(pool, "out:1", {"m": 0.01}).ejected_until = clock.now + 30.0
    slow = add(pool, "slow:1", {"m": 1.0})
    probing = Probing(pool, Ejection())

    probing.prober.eject_latency_outliers()

    assert not slow.ejected(clock.now)


# Registration leases ----------------------------------------------------------------------


class Published(list[list[BackendSpec]]):
    """Every set a discovery published, in order; `changed` is set on each."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, specs: Collection[BackendSpec]) -> None:
        self.append(list(specs))
        self.changed.set()


@contextlib.asynccontextmanager
async def running(discovery: RegistrationDiscovery) -> AsyncIterator[Published]:
    """`discovery.run` as the gateway runs it, with what it publishes."""
    published = Published()
    task = asyncio.create_task(discovery.run(published))
    await asyncio.sleep(0)
    try:
        yield published
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


EDGE = BackendSpec("edge-1:8001", "rpi5", "edge-1:8000", 0.5)


async def test_running_publishes_the_current_set_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)
    discovery.register(EDGE, 15.0)  # before the gateway runs it: kept, published at start

    async with running(discovery) as published:
        assert published == [[EDGE]]


async def test_registering_publishes_the_new_set(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)
    other = BackendSpec("edge-2:8001", "jetson-orin")

    async with running(discovery) as published:
        expires = discovery.register(EDGE, 15.0)
        discovery.register(other, 30.0)

    assert expires == clock.now + 15.0
    assert published == [[], [EDGE], [EDGE, other]]


async def test_renewing_with_the_same_spec_extends_the_lease_without_publishing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)

    async with running(discovery) as published:
        first = discovery.register(EDGE, 15.0)
        clock.advance(10.0)
        renewed = discovery.register(BackendSpec("edge-1:8001", "rpi5", "edge-1:8000", 0.5), 15.0)
        clock.advance(10.0)  # past the first lease, within the renewed one
        assert discovery.expire() == []

    assert renewed == first + 10.0
    assert published == [[], [EDGE]]


@pytest.mark.parametrize(
    "changed",
    [
        BackendSpec("edge-1:8001", "jetson-orin", "edge-1:8000", 0.5),
        BackendSpec("edge-1:8001", "rpi5", "edge-1:9000", 0.5),
        BackendSpec("edge-1:8001", "rpi5", "edge-1:8000", 2.0),
    ],
    ids=["profile", "http_address", "weight"],
)
async def test_a_changed_spec_is_published_again(
    monkeypatch: pytest.MonkeyPatch, changed: BackendSpec
) -> None:
    clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)

    async with running(discovery) as published:
        discovery.register(EDGE, 15.0)
        discovery.register(changed, 15.0)

    assert published == [[], [EDGE], [changed]]


async def test_a_lease_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)

    assert discovery.register(EDGE, 10 * MAX_LEASE_S) == clock.now + MAX_LEASE_S


async def test_expire_drops_the_leases_past_their_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)
    short, long = BackendSpec("short:1"), BackendSpec("long:1")

    async with running(discovery) as published:
        discovery.register(short, 5.0)
        discovery.register(long, 20.0)
        assert discovery.expire(clock.now + 4.9) == []
        assert discovery.expire(clock.now + 5.0) == ["short:1"]
        assert discovery.expire(clock.now + 19.0) == []

    assert published == [[], [short], [short, long], [long]]
    assert set(discovery.leases) == {"long:1"}


async def test_the_sweep_expires_leases_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=0.01)

    async with running(discovery) as published:
        discovery.register(EDGE, 15.0)
        published.changed.clear()
        clock.advance(15.0)
        async with asyncio.timeout(5.0):
            await published.changed.wait()

    assert published == [[], [EDGE], []]


async def test_leaving_publishes_and_an_unknown_address_is_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock_in(monkeypatch, registration)
    discovery = RegistrationDiscovery(sweep_s=3_600.0)

    async with running(discovery) as published:
        discovery.register(EDGE, 15.0)
        assert discovery.leave("edge-1:8001") is True
        assert discovery.leave("edge-1:8001") is False
        assert discovery.leave("never:1") is False

    assert published == [[], [EDGE], []]


# A backend's latency average --------------------------------------------------------------


def test_the_latency_average_follows_observations(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock_in(monkeypatch, backends)
    backend = add(pool, "10.0.0.1:8001")
    assert backend.latency_ewma_s == 0.0

    backend.observe("m", 0.100)
    assert backend.latency_ewma_s == 0.100
    backend.observe("m", 0.200)

    assert backend.latency_ewma_s == pytest.approx(0.100 + EWMA_ALPHA * 0.100)
    assert backend.model_latency_s == {"m": pytest.approx(0.110)}


def test_the_latency_average_fades_when_idle(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, backends)
    backend = add(pool, "10.0.0.1:8001")
    backend.observe("m", 0.5)

    faded = {}
    for idle in (0.0, 0.5, EWMA_FADE_S, 2.0, 3.0, 6.0):
        clock.now = 1_000.0 + idle
        faded[idle] = backend.latency_ewma_s

    assert faded[0.0] == faded[0.5] == faded[EWMA_FADE_S] == 0.5
    assert faded[2.0] == pytest.approx(0.5 / math.e)
    assert faded[3.0] == pytest.approx(0.5 / math.e**2)
    assert faded[6.0] == pytest.approx(0.5 / math.e**5)
    assert backend.model_latency_s == {"m": 0.5}  # outliers are judged on what was seen


def test_an_observation_stops_the_fading(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, backends)
    backend = add(pool, "10.0.0.1:8001")
    backend.observe("m", 0.5)
    clock.advance(0.5)
    backend.observe("m", 0.5)

    clock.advance(0.9)  # 1.4 s after the first, 0.9 s after the last

    assert backend.latency_ewma_s == 0.5


def test_an_observation_moves_the_average_towards_the_sample(
    monkeypatch: pytest.MonkeyPatch, pool: BackendPool
) -> None:
    clock = clock_in(monkeypatch, backends)
    backend = add(pool, "10.0.0.1:8001")
    backend.observe("m", 1.0)  # once slow
    clock.advance(10.0)
    before = backend.latency_ewma_s  # faded to about 0.1 ms: tried again

    backend.observe("m", 0.010)  # and fast now

    assert before <= backend.latency_ewma_s <= 0.010


# The pool ---------------------------------------------------------------------------------


def addresses(pool: BackendPool) -> set[str]:
    return {backend.address for backend in pool}


def test_the_pool_serves_the_union_of_its_sources(pool: BackendPool) -> None:
    pool.publish("config", [BackendSpec("a:1"), BackendSpec("b:1")])
    pool.publish("kubernetes", [BackendSpec("b:1"), BackendSpec("c:1")])
    assert addresses(pool) == {"a:1", "b:1", "c:1"}

    pool.publish("config", [])
    assert addresses(pool) == {"b:1", "c:1"}  # b is still named by the other source

    pool.publish("kubernetes", [BackendSpec("c:1")])
    assert addresses(pool) == {"c:1"}


def test_a_backend_named_again_keeps_its_object_and_state(pool: BackendPool) -> None:
    pool.publish("config", [BackendSpec("a:1", "rpi5")])
    backend = pool.backends["a:1"]
    backend.healthy, backend.models = True, {"m": frozenset({"1"})}

    pool.publish("config", [BackendSpec("a:1", "jetson-orin", weight=3.0)])

    assert pool.backends["a:1"] is backend
    assert (backend.profile, backend.weight) == ("jetson-orin", 3.0)
    assert backend.healthy
    assert backend.serves("m", "1")


def test_the_first_source_to_name_a_backend_gives_its_spec(pool: BackendPool) -> None:
    pool.publish("config", [BackendSpec("a:1", "rpi5")])
    pool.publish("registration", [BackendSpec("a:1", "jetson-orin")])
    backend = pool.backends["a:1"]
    assert backend.profile == "rpi5"

    pool.publish("config", [])

    assert pool.backends["a:1"] is backend
    assert backend.profile == "jetson-orin"


async def test_a_removed_backend_is_closed_once_its_requests_are_answered(
    pool: BackendPool,
) -> None:
    pool.publish("config", [BackendSpec("busy:1"), BackendSpec("idle:1")])
    busy, idle = pool.backends["busy:1"], pool.backends["idle:1"]
    busy.outstanding = 1

    pool.publish("config", [])
    await pool.close_removed()

    assert idle.channel().get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert busy.channel().get_state() is not grpc.ChannelConnectivity.SHUTDOWN
    busy.outstanding = 0
    await pool.close_removed()
    assert busy.channel().get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def test_a_backend_that_comes_back_starts_afresh(pool: BackendPool) -> None:
    pool.publish("config", [BackendSpec("a:1")])
    old = pool.backends["a:1"]
    old.healthy, old.stale = True, False

    pool.publish("config", [])
    pool.publish("config", [BackendSpec("a:1")])

    new = pool.backends["a:1"]
    assert new is not old
    assert (new.healthy, new.stale) == (False, True)  # to be probed before it is used
    await pool.close_removed()
    assert old.channel().get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert new.channel().get_state() is not grpc.ChannelConnectivity.SHUTDOWN
