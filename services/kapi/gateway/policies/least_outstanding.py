"""Power-of-two choices: of two backends drawn at random, the one with less work ahead of it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kapi.gateway.policies import Candidate


class LeastOutstanding:
    """The default policy: draw two distinct candidates, keep the one with the lower score.

    score = (outstanding + 1) * latency EWMA, an estimate of how long a new request would
    wait. A backend without an EWMA yet borrows its rival's, so the pair is compared on
    outstanding requests alone: a new backend wins against a busier one and ties an idle
    one, so it gets traffic at once, and its own outstanding count keeps a burst from piling
    onto it before its first answers come back. Drawing two rather than taking the global
    best keeps gateways that share backends from all stampeding onto the same one.
    """

    name = "least-outstanding"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def choose(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        # int(random() * n) rather than randrange: several times faster, unbiased enough.
        first_index = int(self._random() * count)
        second_index = int(self._random() * (count - 1))
        if second_index >= first_index:
            second_index += 1  # distinct from the first, still uniform over the others
        return better_of(candidates[first_index], candidates[second_index])


def better_of(first: Candidate, second: Candidate) -> Candidate:
    """The one of two with the lower expected wait; `first` on a tie."""
    first_ewma = first.latency_ewma_s
    second_ewma = second.latency_ewma_s
    if first_ewma <= 0.0:
        first_ewma = second_ewma
    if second_ewma <= 0.0:
        second_ewma = first_ewma
    if first_ewma <= 0.0:  # neither has answered yet: compare on load alone
        first_ewma = second_ewma = 1.0
    if (second.outstanding + 1) * second_ewma < (first.outstanding + 1) * first_ewma:
        return second
    return first
