"""Admission on its own: a fake clock-free event loop, requests as tasks. Checks the three limits,
FIFO order (no overtaking, even by a request that would fit), refusals that name the limit, and
that a waiter cancelled (client gone, deadline passed) leaves the queue and lets the next one in."""

from __future__ import annotations

import asyncio

import pytest

from specpipe.coordinator.admission import Admission, AdmissionLimits, Overloaded


def run(coro):
    return asyncio.run(coro)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_admits_up_to_the_concurrency_then_queues_then_refuses():
    async def scenario():
        admission = Admission(AdmissionLimits(max_concurrent_requests=2, max_queued_requests=1))
        assert await admission.acquire(10) == 0.0
        await admission.acquire(10)
        queued = asyncio.create_task(admission.acquire(10))
        await settle()
        assert not queued.done() and admission.waiting == 1 and admission.running == 2
        with pytest.raises(Overloaded, match="max_queued_requests 1"):
            await admission.acquire(10)
        admission.release(10)
        await settle()
        assert queued.done() and admission.running == 2 and admission.waiting == 0
        admission.release(10)
        admission.release(10)
        assert admission.running == 0 and admission.tokens_in_flight == 0

    run(scenario())


def test_tokens_in_flight_limit_and_fifo_order():
    async def scenario():
        admission = Admission(
            AdmissionLimits(max_concurrent_requests=10, max_queued_requests=5, max_tokens_in_flight=100)
        )
        await admission.acquire(60)
        big = asyncio.create_task(admission.acquire(50))  # 110 > 100: waits
        await settle()
        small = asyncio.create_task(admission.acquire(5))  # would fit, but may not overtake
        await settle()
        assert not big.done() and not small.done() and admission.waiting == 2
        admission.release(60)
        await settle()
        assert big.done() and small.done()
        assert admission.tokens_in_flight == 55 and admission.running == 2

    run(scenario())


def test_a_request_that_can_never_fit_is_refused_at_once():
    async def scenario():
        admission = Admission(AdmissionLimits(1, 10, max_tokens_in_flight=100))
        with pytest.raises(Overloaded, match="max_tokens_in_flight of 100"):
            await admission.acquire(101)
        assert admission.waiting == 0 and admission.running == 0

    run(scenario())


def test_zero_queue_refuses_when_full():
    async def scenario():
        admission = Admission(AdmissionLimits(1, 0))
        await admission.acquire(1)
        with pytest.raises(Overloaded, match="max_concurrent_requests 1"):
            await admission.acquire(1)

    run(scenario())


def test_cancelled_waiter_leaves_the_queue_and_unblocks_the_next():
    async def scenario():
        admission = Admission(
            AdmissionLimits(max_concurrent_requests=5, max_queued_requests=5, max_tokens_in_flight=100)
        )
        await admission.acquire(60)
        head = asyncio.create_task(admission.acquire(50))  # blocks the queue
        behind = asyncio.create_task(admission.acquire(30))  # fits, but FIFO keeps it behind
        await settle()
        assert admission.waiting == 2 and not behind.done()
        head.cancel()  # the head's client goes away
        await settle()
        assert head.cancelled() and behind.done() and admission.waiting == 0
        assert admission.tokens_in_flight == 90 and admission.running == 2

    run(scenario())


def test_deadline_while_queued():
    async def scenario():
        admission = Admission(AdmissionLimits(1, 5))
        await admission.acquire(1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(admission.acquire(1), 0.05)
        assert admission.waiting == 0 and admission.running == 1
        admission.release(1)
        assert admission.running == 0

    run(scenario())


def test_cancel_racing_with_admission_gives_the_slot_back():
    """Released and cancelled in the same tick: the waiter was admitted, then its task cancelled
    before it ran; the slot must not leak."""

    async def scenario():
        admission = Admission(AdmissionLimits(1, 5))
        await admission.acquire(1)
        waiter = asyncio.create_task(admission.acquire(1))
        await settle()
        admission.release(1)  # admits the waiter (its future is set)...
        waiter.cancel()  # ...and its task is cancelled before it resumes
        await settle()
        assert admission.running in (0, 1)
        if waiter.cancelled():
            assert admission.running == 0 and admission.tokens_in_flight == 0
        else:  # it resumed admitted: it owns the slot
            admission.release(1)
        assert admission.running == 0

    run(scenario())


def test_waiting_order_is_arrival_order():
    async def scenario():
        admission = Admission(AdmissionLimits(1, 10))
        await admission.acquire(1)
        order = []

        async def request(name):
            await admission.acquire(1)
            order.append(name)
            await asyncio.sleep(0)
            admission.release(1)

        tasks = [asyncio.create_task(request(i)) for i in range(6)]
        await settle()
        admission.release(1)
        await asyncio.gather(*tasks)
        assert order == list(range(6)) and admission.running == 0

    run(scenario())
