"""Routing policies: each picks one of the candidates, in the proportions it promises.

Every random policy gets a seeded Random, so the counts below are the same on every run;
tolerances are still derived from the binomial spread so a reseed would not break them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from kapi.core.errors import InvalidArgument
from kapi.gateway.policies import (
    DEFAULT_POLICY,
    POLICIES,
    Candidate,
    ConsistentHash,
    LeastOutstanding,
    Policy,
    RoundRobin,
    Weighted,
    make_policy,
)

DRAWS = 10_000
KEYS = [f"user-{index}" for index in range(1_000)]


@dataclass(frozen=True)
class Backend:
    address: str
    outstanding: int = 0
    latency_ewma_s: float = 0.0
    weight: float = 1.0


def backends(
    count: int, *, outstanding: int = 0, latency_ewma_s: float = 0.0, weight: float = 1.0
) -> list[Backend]:
    return [
        Backend(f"10.0.0.{index}:8001", outstanding, latency_ewma_s, weight)
        for index in range(count)
    ]


def pick_counts(
    policy: Policy, candidates: Sequence[Candidate], draws: int = DRAWS
) -> Counter[str]:
    return Counter(policy.choose(candidates, None).address for _ in range(draws))


def binomial_tolerance(draws: int, share: float, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(draws * share * (1.0 - share))


def assignment(policy: Policy, candidates: Sequence[Candidate]) -> dict[str, str]:
    return {key: policy.choose(candidates, key).address for key in KEYS}


# --- every policy ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("key", [None, "user-7"])
def test_every_policy_picks_one_of_the_candidates(name: str, key: str | None) -> None:
    policy = make_policy(name)
    shuffler = random.Random(1)
    for count in (1, 2, 3, 8):
        candidates = [
            Backend(
                f"10.0.1.{index}:8001",
                outstanding=shuffler.randrange(5),
                latency_ewma_s=shuffler.choice([0.0, 0.01, 0.2]),
                weight=shuffler.choice([0.0, 1.0, 3.0]),
            )
            for index in range(count)
        ]
        for _ in range(200):
            chosen = policy.choose(candidates, key)
            assert any(chosen is candidate for candidate in candidates)


def test_make_policy_builds_each_by_name() -> None:
    assert DEFAULT_POLICY == "least-outstanding"
    expected = {
        "least-outstanding": LeastOutstanding,
        "round-robin": RoundRobin,
        "weighted": Weighted,
        "consistent-hash": ConsistentHash,
    }
    for name, policy_class in expected.items():
        policy = make_policy(name)
        assert isinstance(policy, policy_class)
        assert policy.name == name
    assert make_policy("round-robin") is not make_policy("round-robin")


def test_make_policy_of_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="'fastest'") as raised:
        make_policy("fastest")
    for name in POLICIES:
        assert name in raised.value.message


# --- least outstanding (power of two choices) --------------------------------------------


def test_p2c_with_one_candidate_returns_it() -> None:
    only = Backend("10.0.0.1:8001", outstanding=50, latency_ewma_s=3.0)
    assert LeastOutstanding(random.Random(0)).choose([only], None) is only


def test_p2c_with_two_candidates_always_takes_the_better() -> None:
    idle, busy = Backend("idle:1", 0, 0.05), Backend("busy:1", 10, 0.05)
    fast, slow = Backend("fast:1", 2, 0.01), Backend("slow:1", 2, 0.1)
    policy = LeastOutstanding(random.Random(2))
    assert pick_counts(policy, [idle, busy], 1_000) == {"idle:1": 1_000}
    assert pick_counts(policy, [slow, fast], 1_000) == {"fast:1": 1_000}


def test_p2c_splits_evenly_between_equals() -> None:
    counts = pick_counts(LeastOutstanding(random.Random(3)), backends(2, latency_ewma_s=0.05))
    assert abs(counts["10.0.0.0:8001"] - DRAWS / 2) < binomial_tolerance(DRAWS, 0.5)


def test_p2c_sends_far_less_to_a_loaded_backend() -> None:
    candidates = [
        Backend("loaded:1", outstanding=10, latency_ewma_s=0.05),
        Backend("half:1", outstanding=5, latency_ewma_s=0.05),
        *backends(2, latency_ewma_s=0.05),
    ]
    counts = pick_counts(LeastOutstanding(random.Random(4)), candidates)
    # The worst of a distinct pair never wins, so the most loaded backend gets nothing; the
    # next worse wins only against it: 1 pair of 6, each pair drawn with probability 1/6.
    assert counts["loaded:1"] == 0
    assert abs(counts["half:1"] - DRAWS / 6) < binomial_tolerance(DRAWS, 1 / 6)
    assert counts["10.0.0.0:8001"] > 2 * counts["half:1"]


def test_p2c_prefers_the_faster_backend_at_equal_load() -> None:
    candidates = [
        Backend("slow:1", outstanding=1, latency_ewma_s=0.5),
        *backends(3, outstanding=1, latency_ewma_s=0.02),
    ]
    counts = pick_counts(LeastOutstanding(random.Random(5)), candidates)
    assert counts["slow:1"] == 0
    assert sum(counts.values()) == DRAWS


def test_p2c_weighs_load_against_latency() -> None:
    # 3 outstanding at 10 ms (score 0.04) beats 0 outstanding at 100 ms (score 0.1).
    quick_but_busy = Backend("quick:1", outstanding=3, latency_ewma_s=0.01)
    idle_but_slow = Backend("idle:1", outstanding=0, latency_ewma_s=0.1)
    policy = LeastOutstanding(random.Random(6))
    assert pick_counts(policy, [idle_but_slow, quick_but_busy], 100) == {"quick:1": 100}


def test_p2c_gives_a_new_backend_without_ewma_traffic() -> None:
    new = Backend("new:1", outstanding=0, latency_ewma_s=0.0)
    established = backends(3, outstanding=1, latency_ewma_s=0.001)
    counts = pick_counts(LeastOutstanding(random.Random(7)), [*established, new])
    # It wins every pair it is in (half of all pairs), however fast the others are.
    assert abs(counts["new:1"] - DRAWS / 2) < binomial_tolerance(DRAWS, 1 / 2)


def test_p2c_ties_a_new_backend_with_an_idle_one_and_loses_to_it_when_busy() -> None:
    idle = Backend("idle:1", outstanding=0, latency_ewma_s=0.2)
    new = Backend("new:1", outstanding=0)
    counts = pick_counts(LeastOutstanding(random.Random(8)), [idle, new])
    assert abs(counts["new:1"] - DRAWS / 2) < binomial_tolerance(DRAWS, 0.5)
    busy_new = Backend("new:1", outstanding=4)
    counts = pick_counts(LeastOutstanding(random.Random(8)), [idle, busy_new], 100)
    assert counts == {"idle:1": 100}


def test_p2c_without_any_ewma_compares_load() -> None:
    candidates = [Backend("busy:1", outstanding=3), *backends(2)]
    counts = pick_counts(LeastOutstanding(random.Random(9)), candidates)
    assert counts["busy:1"] == 0
    assert abs(counts["10.0.0.0:8001"] - DRAWS / 2) < binomial_tolerance(DRAWS, 0.5)


# --- round robin -------------------------------------------------------------------------


def test_round_robin_is_exactly_even() -> None:
    policy, candidates = RoundRobin(), backends(5)
    counts = pick_counts(policy, candidates, 5 * 40)
    assert counts == {candidate.address: 40 for candidate in candidates}


def test_round_robin_visits_in_order() -> None:
    candidates = backends(3)
    policy = RoundRobin()
    picks = [policy.choose(candidates, None) for _ in range(6)]
    assert picks == [*candidates, *candidates]


def test_round_robin_stays_even_after_the_set_changes() -> None:
    policy, candidates = RoundRobin(), backends(4)
    pick_counts(policy, candidates, 7)  # leave the counter mid-rotation
    shrunk = candidates[:3]
    assert pick_counts(policy, shrunk, 3 * 25) == {backend.address: 25 for backend in shrunk}
    grown = [*candidates, Backend("10.0.0.9:8001")]
    assert pick_counts(policy, grown, 5 * 25) == {backend.address: 25 for backend in grown}


# --- weighted ----------------------------------------------------------------------------


def test_weighted_splits_three_to_one() -> None:
    heavy, light = Backend("heavy:1", weight=3.0), Backend("light:1", weight=1.0)
    counts = pick_counts(Weighted(random.Random(10)), [light, heavy])
    assert abs(counts["heavy:1"] - DRAWS * 0.75) < binomial_tolerance(DRAWS, 0.75)
    assert counts["heavy:1"] + counts["light:1"] == DRAWS


def test_weighted_with_all_zero_weights_is_uniform() -> None:
    candidates = backends(4, weight=0.0)
    counts = pick_counts(Weighted(random.Random(11)), candidates)
    for candidate in candidates:
        assert abs(counts[candidate.address] - DRAWS / 4) < binomial_tolerance(DRAWS, 0.25)


@pytest.mark.parametrize("unusable", [0.0, -2.0, math.nan, math.inf])
def test_weighted_never_picks_an_unusable_weight_beside_a_usable_one(unusable: float) -> None:
    candidates = [Backend("bad:1", weight=unusable), *backends(2, weight=1.0)]
    candidates.append(Backend("bad:2", weight=unusable))
    counts = pick_counts(Weighted(random.Random(12)), candidates)
    assert counts["bad:1"] == counts["bad:2"] == 0
    assert abs(counts["10.0.0.0:8001"] - DRAWS / 2) < binomial_tolerance(DRAWS, 0.5)


# --- consistent hash ---------------------------------------------------------------------


def test_hash_sends_a_key_to_the_same_backend_in_any_order() -> None:
    policy, candidates = ConsistentHash(), backends(5)
    first = assignment(policy, candidates)
    assert assignment(policy, candidates) == first
    assert assignment(ConsistentHash(), list(reversed(candidates))) == first
    assert len(set(first.values())) == 5


def test_hash_spreads_keys_evenly() -> None:
    counts = Counter(assignment(ConsistentHash(), backends(4)).values())
    for count in counts.values():
        assert abs(count - len(KEYS) / 4) < binomial_tolerance(len(KEYS), 0.25)


def test_hash_removing_a_backend_moves_only_its_keys() -> None:
    policy, candidates = ConsistentHash(), backends(5)
    before = assignment(policy, candidates)
    removed = candidates.pop(2)
    after = assignment(policy, candidates)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == removed.address}
    assert moved  # the removed backend held some keys


def test_hash_adding_a_backend_moves_about_one_in_n_plus_one() -> None:
    policy, candidates = ConsistentHash(), backends(5)
    before = assignment(policy, candidates)
    added = Backend("10.0.0.99:8001")
    after = assignment(policy, [*candidates, added])
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == added.address for key in moved)
    assert abs(len(moved) - len(KEYS) / 6) < binomial_tolerance(len(KEYS), 1 / 6)


def test_hash_weights_skew_the_share_of_keys() -> None:
    heavy, light = Backend("heavy:1", weight=3.0), Backend("light:1", weight=1.0)
    keys = [f"session-{index}" for index in range(DRAWS)]
    policy = ConsistentHash()
    heavy_keys = sum(policy.choose([heavy, light], key) is heavy for key in keys)
    assert abs(heavy_keys - DRAWS * 0.75) < binomial_tolerance(DRAWS, 0.75)


def test_hash_gives_a_zero_weight_no_keys_unless_all_are_zero() -> None:
    policy = ConsistentHash()
    drained = Backend("drained:1", weight=0.0)
    beside_others = assignment(policy, [drained, *backends(2)])
    assert "drained:1" not in beside_others.values()
    all_zero = Counter(assignment(policy, [drained, *backends(2, weight=0.0)]).values())
    assert len(all_zero) == 3


def test_hash_without_a_key_falls_back_to_least_outstanding() -> None:
    candidates = [Backend("busy:1", outstanding=9, latency_ewma_s=0.05)]
    candidates += backends(2, latency_ewma_s=0.05)
    counts = pick_counts(ConsistentHash(random.Random(13)), candidates)
    assert counts["busy:1"] == 0
    assert abs(counts["10.0.0.0:8001"] - DRAWS / 2) < binomial_tolerance(DRAWS, 0.5)
