"""Round robin: each request to the next candidate in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kapi.gateway.policies import Candidate


class RoundRobin:
    """Rotate over the candidates with one counter, taken modulo the number of candidates.

    While the set is unchanged, any run of len(candidates) * k calls picks each backend
    exactly k times. When the set changes the counter carries on: the rotation resumes over
    the new list from wherever the counter points, so around a change one backend may be
    picked twice in a row or skipped once, and the spread is even again from then on. The
    gateway is expected to pass the candidates in a stable order (e.g. by address).
    """

    name = "round-robin"

    def __init__(self, start: int = 0) -> None:
        self._counter = itertools.count(start)

    def choose(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        return candidates[next(self._counter) % len(candidates)]
