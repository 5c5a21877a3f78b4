"""Admission control: bounded concurrency, a priority queue, shedding the least important."""

from __future__ import annotations

import asyncio

import pytest

from headrace.domain import Priority
from headrace.errors import OverloadedError
from headrace.gateway.admission import Admission
from headrace.observability.metrics import Metrics


async def hold(
    admission: Admission, priority: Priority, release: asyncio.Event, log: list[str], name: str
) -> None:
    async with admission.slot(priority):
        log.append(name)
        await release.wait()


async def test_concurrency_is_bounded_and_waiters_go_by_priority() -> None:
    admission = Admission(max_concurrent=1, max_queue=10, max_wait_s=5)
    gate = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(hold(admission, Priority.NORMAL, gate, order, "first"))
    await asyncio.sleep(0)
    low = asyncio.create_task(hold(admission, Priority.LOW, gate, order, "low"))
    normal = asyncio.create_task(hold(admission, Priority.NORMAL, gate, order, "normal"))
    high = asyncio.create_task(hold(admission, Priority.HIGH, gate, order, "high"))
    await asyncio.sleep(0.01)
    assert order == ["first"]
    assert admission.waiting == 3
    gate.set()
    await asyncio.gather(first, low, normal, high)
    assert order == ["first", "high", "normal", "low"]
    assert admission.free == 1


async def test_a_full_queue_sheds_the_least_important() -> None:
    metrics = Metrics()
    admission = Admission(max_concurrent=1, max_queue=1, max_wait_s=5, metrics=metrics)
    gate = asyncio.Event()
    order: list[str] = []
    running = asyncio.create_task(hold(admission, Priority.NORMAL, gate, order, "running"))
    await asyncio.sleep(0)
    low = asyncio.create_task(hold(admission, Priority.LOW, gate, order, "low"))
    await asyncio.sleep(0)
    # A newcomer no more important than the waiter is refused at once...
    with pytest.raises(OverloadedError) as info:
        async with admission.slot(Priority.LOW):
            pass
    assert info.value.status == 503
    assert "Retry-After" in info.value.headers
    # ...a more important one takes the waiter's place.
    high = asyncio.create_task(hold(admission, Priority.HIGH, gate, order, "high"))
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError):
        await low
    gate.set()
    await asyncio.gather(running, high)
    assert order == ["running", "high"]
    text = metrics.render().decode()
    assert 'headrace_shed_total{priority="low"} 2.0' in text


async def test_waiting_too_long_is_shed() -> None:
    admission = Admission(max_concurrent=1, max_queue=5, max_wait_s=0.05)
    gate = asyncio.Event()
    running = asyncio.create_task(hold(admission, Priority.NORMAL, gate, [], "running"))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="waited"):
        async with admission.slot(Priority.HIGH):
            pass
    gate.set()
    await running
    assert admission.free == 1
    assert admission.waiting == 0


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    admission = Admission(max_concurrent=1, max_queue=5, max_wait_s=5)
    gate = asyncio.Event()
    order: list[str] = []
    running = asyncio.create_task(hold(admission, Priority.NORMAL, gate, order, "running"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(admission, Priority.NORMAL, gate, order, "cancelled"))
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await running
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.free == 1
    assert order == ["running"]
