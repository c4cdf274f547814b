"""Triton's scheduling queue (core `scheduler_utils.cc` PriorityQueue and PolicyQueue): one
queue per priority level, level 1 first, each with its queue policy.

- A request's `priority` picks its level; 0, or one past `priority_levels`, is the
  `default_priority_level`. Without priority levels there is one queue.
- A level's policy is its `priority_queue_policy`, else `default_queue_policy`:
  `max_queue_size` (0: no limit) refuses a request when the level is full;
  `default_timeout_microseconds` (0: none) is how long a request may wait, which a request's
  `timeout` may shorten when `allow_timeout_override` is set; once it has waited that long,
  `timeout_action` REJECT fails it with UNAVAILABLE, and DELAY moves it behind the requests
  of its level that have not timed out.

Not thread-safe: the scheduler guards it with its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from kapi.core._generated.inference import model_config_pb2 as mc

Policy = mc.ModelQueuePolicy


class Queued(Protocol):
    """What the queue needs of a job: its level and whether its wait timed out."""

    level: int
    delayed: bool


J = TypeVar("J", bound=Queued)


class JobQueue(Generic[J]):
    def __init__(self, batching: mc.ModelDynamicBatching | None = None) -> None:
        batching = batching or mc.ModelDynamicBatching()
        self.levels = batching.priority_levels
        self.default_level = batching.default_priority_level if self.levels else 0
        self._default = batching.default_queue_policy
        self._policies = dict(batching.priority_queue_policy)
        # level -> (jobs waiting, jobs whose wait timed out with DELAY), served in that order
        self._queues: dict[int, tuple[deque[J], deque[J]]] = {}
        self._order: list[int] = []

    def level_of(self, priority: int) -> int:
        if not self.levels:
            return 0
        return priority if 0 < priority <= self.levels else self.default_level

    def policy(self, level: int) -> Policy:
        return self._policies.get(level, self._default)

    def timeout_us(self, level: int, requested_us: int) -> int:
        """How long a request may wait at `level` (0: for ever)."""
        policy = self.policy(level)
        timeout = policy.default_timeout_microseconds
        if policy.allow_timeout_override and 0 < requested_us < timeout:
            timeout = requested_us
        return timeout

    def full(self, level: int) -> int:
        """The level's max_queue_size when it is reached, else 0."""
        limit = self.policy(level).max_queue_size
        waiting, delayed = self._queues.get(level, ((), ()))
        return limit if limit and len(waiting) + len(delayed) >= limit else 0

    def append(self, job: J) -> None:
        self._pair(job)[job.delayed].append(job)

    def push_front(self, jobs: list[J]) -> None:
        """Put back jobs taken from the front, where they were."""
        for job in reversed(jobs):
            self._pair(job)[job.delayed].appendleft(job)

    def delay(self, job: J) -> None:
        """Move a job whose wait timed out behind the level's jobs that have not."""
        waiting, delayed = self._pair(job)
        waiting.remove(job)
        job.delayed = True
        delayed.append(job)

    def remove(self, job: J) -> bool:
        try:
            self._pair(job)[job.delayed].remove(job)
        except ValueError:
            return False
        return True

    def peek(self) -> J | None:
        for job in self:
            return job
        return None

    def popleft(self) -> J:
        for level in self._order:
            for queue in self._queues[level]:
                if queue:
                    return queue.popleft()
        raise IndexError("pop from an empty queue")

    def clear(self) -> list[J]:
        jobs = list(self)
        self._queues.clear()
        self._order.clear()
        return jobs

    def keep(self, wanted: list[J]) -> None:
        """Keep only `wanted` of the jobs, in their order."""
        kept = set(map(id, wanted))
        for pair in self._queues.values():
            for queue in pair:
                live = [job for job in queue if id(job) in kept]
                queue.clear()
                queue.extend(live)

    def __iter__(self) -> Iterator[J]:
        for level in self._order:
            for queue in self._queues[level]:
                yield from queue

    def __len__(self) -> int:
        return sum(len(queue) for pair in self._queues.values() for queue in pair)

    def __bool__(self) -> bool:
        return any(queue for pair in self._queues.values() for queue in pair)

    def _pair(self, job: J) -> tuple[deque[J], deque[J]]:
        pair = self._queues.get(job.level)
        if pair is None:
            pair = self._queues[job.level] = (deque(), deque())
            self._order = sorted(self._queues)
        return pair
