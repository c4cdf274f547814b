"""Consistent hashing: the same key to the same backend, by rendezvous hashing."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kapi.gateway.policies.least_outstanding import LeastOutstanding
from kapi.gateway.policies.weighted import usable_weight

if TYPE_CHECKING:
    from kapi.gateway.policies import Candidate

# Weights below this count as this: a zero-weight backend gets (almost) no keys while others
# have weight, and a set whose weights are all zero still spreads keys evenly.
_MIN_WEIGHT = 1e-9
_TWO_TO_MINUS_52 = 2.0**-52


class ConsistentHash:
    """Weighted rendezvous (highest random weight) hashing of `key` over the addresses.

    Each candidate scores weight / -ln(h), h in (0, 1) a hash of (key, address); the highest
    score wins. The same key goes to the same backend while the set is unchanged, whatever
    the order of the candidates; removing a backend moves only the keys it held, adding one
    moves to it about weight / total weight of the keys, and each backend's share of keys is
    proportional to its weight. With no key (the route names no hashing parameter, or the
    request lacks it), the choice falls back to least outstanding.
    """

    name = "consistent-hash"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._fallback = LeastOutstanding(rng)

    def choose(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        if key is None:
            return self._fallback.choose(candidates, key)
        if len(candidates) == 1:
            return candidates[0]
        # Hash the key once; each candidate copies that state and adds its address.
        keyed = hashlib.blake2b(key.encode(), digest_size=8)
        keyed.update(b"\x00")  # so that ("ab", "c") and ("a", "bc") differ
        best = candidates[0]
        best_score = -1.0
        for candidate in candidates:
            weight = max(usable_weight(candidate.weight), _MIN_WEIGHT)
            score = weight / -math.log(unit_hash(keyed, candidate.address))
            if score > best_score:
                best, best_score = candidate, score
        return best


def unit_hash(keyed: hashlib.blake2b, address: str) -> float:
    """A hash of (key, address) spread uniformly over the open interval (0, 1)."""
    hasher = keyed.copy()
    hasher.update(address.encode())
    # 52 bits plus one half: exactly representable, never 0, never 1, so the log is < 0.
    bits = int.from_bytes(hasher.digest(), "big") >> 12
    return (bits + 0.5) * _TWO_TO_MINUS_52
