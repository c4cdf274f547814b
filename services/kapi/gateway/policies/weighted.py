"""Weighted random: each candidate with a probability proportional to its weight."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kapi.gateway.policies import Candidate


class Weighted:
    """Pick at random, in proportion to `candidate.weight`.

    A weight that is not a positive finite number (zero, negative, NaN, infinite) counts as
    zero: such a backend is never picked while another has a positive weight. When none
    has, the choice is uniform.
    """

    name = "weighted"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def choose(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        total = 0.0
        for candidate in candidates:
            total += usable_weight(candidate.weight)
        if total <= 0.0:
            return candidates[int(self._random() * len(candidates))]
        remaining = self._random() * total
        last_weighted = candidates[0]
        for candidate in candidates:
            weight = usable_weight(candidate.weight)
            if weight > 0.0:
                last_weighted = candidate
                remaining -= weight
                if remaining < 0.0:
                    return candidate
        return last_weighted  # rounding in the sum left a sliver past the last weight


def usable_weight(weight: float) -> float:
    """`weight` if it is a positive finite number, else 0."""
    return weight if 0.0 < weight < math.inf else 0.0
