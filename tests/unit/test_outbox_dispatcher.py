"""OutboxDispatcher's polling: it backs off while the outbox is empty, and a nudge starts a
pass at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from headrace.events.webhooks import WebhookSender
from headrace.queue.base import JobQueue, OutboxItem
from headrace.worker.outbox import OutboxDispatcher


class EmptyOutbox:
    """The part of the queue the dispatcher reads: an outbox that never has anything due."""

    def __init__(self) -> None:
        self.passes: list[float] = []

    async def due_webhooks(self, limit: int) -> list[OutboxItem]:
        self.passes.append(time.monotonic())
        return []


def dispatcher(outbox: EmptyOutbox, **options: Any) -> OutboxDispatcher:
    queue: Any = outbox  # only due_webhooks is called when nothing is due
    typed: JobQueue = queue
    return OutboxDispatcher(typed, WebhookSender(allow_private=False), "secret", **options)


async def test_an_idle_outbox_is_polled_less_and_less_often() -> None:
    outbox = EmptyOutbox()
    worker = dispatcher(outbox, poll_s=0.01, idle_poll_s=0.08)
    await worker.start()
    await asyncio.sleep(0.6)
    await worker.aclose()
    gaps = [b - a for a, b in zip(outbox.passes, outbox.passes[1:], strict=False)]
    # 0.01, 0.02, 0.04, then 0.08 at most: about 10 passes, where a fixed 0.01 s makes 60
    assert 6 <= len(outbox.passes) <= 14
    assert max(gaps) < 0.08 + 0.1
    assert gaps[-1] >= 0.08 * 0.9


async def test_a_nudge_starts_a_pass_at_once() -> None:
    outbox = EmptyOutbox()
    worker = dispatcher(outbox, poll_s=0.05, idle_poll_s=5.0)
    await worker.start()
    await asyncio.sleep(1.0)  # passes at 0, 0.05, 0.15, 0.35, 0.75; the next at 1.55
    backed_off = len(outbox.passes)
    nudged = time.monotonic()
    worker.nudge()
    while len(outbox.passes) == backed_off and time.monotonic() - nudged < 0.4:
        await asyncio.sleep(0.005)
    await worker.aclose()
    assert backed_off <= 6
    assert len(outbox.passes) > backed_off, "no pass within 0.4 s of the nudge"
    assert outbox.passes[backed_off] - nudged < 0.4  # the next scheduled one: 0.55 s later
