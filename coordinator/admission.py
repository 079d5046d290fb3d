"""Bounded admission: how many requests run at once, how many wait, how many tokens they hold.

A request costs one slot and `prompt + max_new_tokens` tokens (its worst-case KV footprint on
each worker) from the moment it is admitted until it finishes. A request that does not fit waits
in a bounded FIFO queue; one that finds the queue full is refused at once (`Overloaded`, which the
servicer maps to RESOURCE_EXHAUSTED), and so is one that could never fit. The queue is strictly
first in, first out: a small request does not overtake a big one at the head, so big requests are
never starved. A waiter that goes away (its client cancelled, its deadline passed: the asyncio
task is cancelled) leaves the queue and the requests behind it move up.

This module knows nothing of gRPC, workers or tokens beyond their count; it runs on one event
loop and needs no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass


class Overloaded(Exception):
    """The server is at a limit; the message names it and the flag that sets it."""


@dataclass(frozen=True)
class AdmissionLimits:
    max_concurrent_requests: int  # requests running at once (>= 1)
    max_queued_requests: int  # requests waiting for a slot (>= 0; 0 = refuse at once when full)
    max_tokens_in_flight: int = 0  # sum of prompt + max_new_tokens over running requests; 0 = no limit

    def __post_init__(self):
        assert self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1"
        assert self.max_queued_requests >= 0, "max_queued_requests must be >= 0"
        assert self.max_tokens_in_flight >= 0, "max_tokens_in_flight must be >= 0"


@dataclass(eq=False)
class _Waiter:
    cost: int
    admitted: asyncio.Future


class Admission:
    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self.running = 0
        self.tokens_in_flight = 0
        self.queue: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def _fits(self, cost: int) -> bool:
        limits = self.limits
        if self.running >= limits.max_concurrent_requests:
            return False
        return not limits.max_tokens_in_flight or self.tokens_in_flight + cost <= limits.max_tokens_in_flight

    def _take(self, cost: int) -> None:
        self.running += 1
        self.tokens_in_flight += cost

    async def acquire(self, cost: int) -> float:
        """Wait for a slot for a request of `cost` tokens; returns the seconds it waited.
        Raises Overloaded when it cannot be queued. Every successful acquire must be paired with
        one release(cost)."""
        limits = self.limits
        if limits.max_tokens_in_flight and cost > limits.max_tokens_in_flight:
            raise Overloaded(
                f"the request needs {cost} tokens in flight (prompt + max_new_tokens), more than "
                f"the server's max_tokens_in_flight of {limits.max_tokens_in_flight}"
            )
        if not self.queue and self._fits(cost):
            self._take(cost)
            return 0.0
        if len(self.queue) >= limits.max_queued_requests:
            raise Overloaded(
                f"the server is at capacity: {self.running} requests running "
                f"(max_concurrent_requests {limits.max_concurrent_requests}, "
                f"{self.tokens_in_flight} tokens in flight, max_tokens_in_flight "
                f"{limits.max_tokens_in_flight or 'unlimited'}) and {len(self.queue)} waiting "
                f"(max_queued_requests {limits.max_queued_requests}); retry later"
            )
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self.queue.append(waiter)
        started = time.monotonic()
        try:
            await waiter.admitted
        except BaseException:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self.release(cost)  # admitted and cancelled in the same tick: give it back
            else:
                if waiter in self.queue:
                    self.queue.remove(waiter)
                self._admit_waiters()  # the head may have left: the next one may fit now
            raise
        return time.monotonic() - started

    def release(self, cost: int) -> None:
        assert self.running > 0 and self.tokens_in_flight >= cost, "release without a matching acquire"
        self.running -= 1
        self.tokens_in_flight -= cost
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self.queue:
            waiter = self.queue[0]
            if waiter.admitted.done():  # cancelled; its task has yet to run its except clause
                self.queue.popleft()
                continue
            if not self._fits(waiter.cost):
                return
            self.queue.popleft()
            self._take(waiter.cost)
            waiter.admitted.set_result(None)
