import asyncio

import pytest

from headrace.queue.grouping import GroupCommit


class Writes:
    """A write that records its batches and can be held open, or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None

    async def __call__(self, items: list[int]) -> list[str]:
        self.batches.append(items)
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [f"stored {n}" for n in items]


async def test_items_arriving_during_a_write_share_the_next_one() -> None:
    writes = Writes()
    group = GroupCommit(writes, max_batch=100)
    writes.gate.clear()
    first = asyncio.ensure_future(group.add(0))
    await asyncio.sleep(0)  # the first write starts at once, alone
    rest = [asyncio.ensure_future(group.add(n)) for n in range(1, 11)]
    await asyncio.sleep(0)
    writes.gate.set()
    assert await first == "stored 0"
    assert await asyncio.gather(*rest) == [f"stored {n}" for n in range(1, 11)]
    assert writes.batches == [[0], list(range(1, 11))]


async def test_batches_are_cut_at_max_batch() -> None:
    writes = Writes()
    group = GroupCommit(writes, max_batch=4)
    writes.gate.clear()
    adds = [asyncio.ensure_future(group.add(n)) for n in range(10)]
    await asyncio.sleep(0)
    writes.gate.set()
    await asyncio.gather(*adds)
    assert [len(b) for b in writes.batches] == [4, 4, 2]
    assert sorted(n for b in writes.batches for n in b) == list(range(10))


async def test_a_failed_write_fails_its_items_only() -> None:
    writes = Writes()
    group = GroupCommit(writes, max_batch=100)
    writes.gate.clear()
    doomed = asyncio.ensure_future(group.add(1))
    await asyncio.sleep(0)
    writes.fail_with = ConnectionError("database gone")
    writes.gate.set()
    with pytest.raises(ConnectionError):
        await doomed
    writes.fail_with = None
    assert await group.add(2) == "stored 2"


async def test_a_caller_that_goes_away_does_not_take_its_item_back() -> None:
    writes = Writes()
    group = GroupCommit(writes, max_batch=100)
    writes.gate.clear()
    caller = asyncio.ensure_future(group.add(7))
    await asyncio.sleep(0)
    caller.cancel()
    writes.gate.set()
    await group.wait_idle()
    assert writes.batches == [[7]]
