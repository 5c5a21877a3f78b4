"""UsageWriter: batching, the flush interval, spooling while the sink fails, replay, shutdown.

The sink is the real in-memory store behind a switch that makes it fail, hang, or fail after
committing (the write went in but the writer cannot know). "Exactly once" is checked on both
the stored records and the per-day aggregates, which count only newly inserted rows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from headrace.accounting.usage import UsageWriter
from headrace.domain import UsageRecord
from headrace.store.memory import MemoryStore

DAY = 1_780_000_000.0  # a fixed UTC time, so all records land on one day


def make_record(i: int, prefix: str = "u") -> UsageRecord:
    return UsageRecord(
        id=f"{prefix}{i:08d}",
        request_id=f"req-{prefix}{i}",
        created_at=DAY + i % 100,
        operation="chat",
        key_id=f"key-{i % 3}",
        team_id="team-a" if i % 2 else None,
        model="gpt-4o-mini",
        requested_model="gpt-4o-mini",
        deployment="d1",
        prompt_tokens=10,
        completion_tokens=5,
        cost_micro_usd=7,
    )


class SwitchableSink:
    """The in-memory store, switchable to fail, to hang, or to fail after committing."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.mode = "ok"  # "ok" | "fail" | "hang" | "hang_and_linger" | "fail_after_commit"
        self.batches: list[int] = []  # sizes of the calls that reached the store
        self.attempts = 0

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        self.attempts += 1
        if self.mode == "fail":
            raise ConnectionError("connection refused (the database is down)")
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "hang_and_linger":  # like psycopg: cancelled, it cleans up for a while
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(1.0)
        self.batches.append(len(records))
        new = await self.store.write_usage(records)
        if self.mode == "fail_after_commit":
            raise TimeoutError("the commit went through, its answer did not")
        return new

    async def stored(self) -> int:
        return await self.store.count_usage_records()

    async def aggregated(self) -> int:
        rows = await self.store.usage_summary([])
        return sum(row.requests for row in rows)


async def until(condition: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("usage-*.jsonl"))


def spooled_ids(directory: Path) -> list[str]:
    ids = []
    for path in spool_files(directory):
        ids += [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]
    return ids


async def exactly_once(sink: SwitchableSink, n: int) -> None:
    assert await sink.stored() == n
    assert await sink.aggregated() == n  # none doubled in the per-day totals either


@pytest.fixture
def sink() -> SwitchableSink:
    return SwitchableSink()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def writer_for(sink: SwitchableSink, spool: Path, **options: Any) -> UsageWriter:
    values: dict[str, Any] = {
        "flush_interval_s": 0.02,
        "retry_interval_s": 0.05,
        "max_retry_interval_s": 0.2,
        "write_timeout_s": 0.5,
    }
    values.update(options)
    return UsageWriter(sink, spool, **values)


async def test_many_records_go_in_few_batches(sink: SwitchableSink, spool: Path) -> None:
    writer = writer_for(sink, spool, batch_size=100, flush_interval_s=30)
    await writer.start()
    for i in range(1000):
        writer.record(make_record(i))
    await until(sink.stored)
    await until(lambda: writer.written == 1000)
    assert sink.batches == [100] * 10
    await writer.aclose()
    await exactly_once(sink, 1000)
    assert (writer.spooled, writer.replayed, writer.pending) == (0, 0, 0)


async def test_a_partial_batch_waits_at_most_the_flush_interval(
    sink: SwitchableSink, spool: Path
) -> None:
    writer = writer_for(sink, spool, batch_size=1000, flush_interval_s=0.1)
    await writer.start()
    await asyncio.sleep(0.05)  # past the start-up replay
    started = time.monotonic()
    for i in range(3):
        writer.record(make_record(i))
    assert writer.pending == 3
    await until(lambda: writer.written == 3, timeout_s=2)
    assert time.monotonic() - started < 0.5
    assert sink.batches == [3]
    await writer.aclose()


async def test_record_is_synchronous_and_cheap(sink: SwitchableSink, spool: Path) -> None:
    writer = writer_for(sink, spool)
    assert not asyncio.iscoroutinefunction(writer.record)
    records = [make_record(i) for i in range(10_000)]
    started = time.perf_counter()
    for record in records:
        writer.record(record)
    per_call_s = (time.perf_counter() - started) / len(records)
    assert per_call_s < 20e-6  # about 0.2 us measured; generous for a loaded machine
    assert writer.pending == 10_000
    await writer.aclose()
    await exactly_once(sink, 10_000)


async def test_sink_down_mid_load_then_back_stores_each_record_once(
    sink: SwitchableSink, spool: Path
) -> None:
    writer = writer_for(sink, spool, batch_size=50)
    await writer.start()
    n = 3000

    async def load(start: int, stop: int) -> None:
        for i in range(start, stop):
            writer.record(make_record(i))
            if i % 25 == 0:
                await asyncio.sleep(0.001)  # requests arrive over time

    await load(0, 1000)
    sink.mode = "fail"
    await load(1000, 1800)
    await until(lambda: writer.spooling)
    sink.mode = "fail_after_commit"  # stored, but the writer sees a failure
    committed = len(sink.batches)
    await load(1800, 2200)
    await until(lambda: len(sink.batches) > committed)
    sink.mode = "ok"
    await load(2200, n)
    await until(lambda: not writer.spooling and not spool_files(spool))
    await writer.aclose()

    await exactly_once(sink, n)
    assert writer.spooled > 0
    assert writer.replayed >= writer.spooled  # every spooled record went back to the sink
    assert sum(sink.batches) > n  # some were sent twice; the store kept them once
    assert writer.pending == 0
    assert writer.unspooled == 0


async def test_hanging_sink_times_out_and_spools(sink: SwitchableSink, spool: Path) -> None:
    sink.mode = "hang"
    writer = writer_for(sink, spool, batch_size=10, write_timeout_s=0.1)
    await writer.start()
    for i in range(50):
        writer.record(make_record(i))
    await until(lambda: writer.spooled == 50)
    assert writer.spooling
    assert writer.pending == 0
    assert sorted(spooled_ids(spool)) == [make_record(i).id for i in range(50)]

    sink.mode = "ok"
    await until(sink.stored)
    await until(lambda: not spool_files(spool))
    await writer.aclose()
    await exactly_once(sink, 50)
    assert writer.replayed == 50


async def test_a_timeout_spools_on_time_while_the_sink_cleans_up(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "hang_and_linger"
    writer = writer_for(sink, spool, batch_size=10, write_timeout_s=0.1, retry_interval_s=60)
    await writer.start()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    for i in range(10):
        writer.record(make_record(i))
    await until(lambda: writer.spooled == 10)
    assert time.monotonic() - started < 0.6  # not 0.1 s + the sink's 1 s of clean-up
    await writer.aclose()  # waits for the abandoned write to finish cleaning up


async def test_retries_back_off_while_the_sink_stays_down(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "fail"
    writer = writer_for(sink, spool, retry_interval_s=0.05, max_retry_interval_s=0.4)
    await writer.start()
    writer.record(make_record(0))
    await asyncio.sleep(1.0)
    # 0.05, 0.1, 0.2, 0.4, 0.4 ... -> about 5 tries in a second, not 20
    assert 2 <= sink.attempts <= 8
    await writer.aclose()
    assert spooled_ids(spool) == [make_record(0).id]


async def test_full_buffer_spills_to_the_spool(sink: SwitchableSink, spool: Path) -> None:
    writer = writer_for(sink, spool, max_buffer=10)
    for i in range(25):  # not started: nothing drains the buffer
        writer.record(make_record(i))
    assert writer.pending == 10
    assert writer.spooled == 15
    assert spooled_ids(spool) == [make_record(i).id for i in range(10, 25)]

    await writer.start()  # replays the spilled records and flushes the buffer
    await until(lambda: writer.written + writer.replayed == 25)
    await writer.aclose()
    await exactly_once(sink, 25)
    assert not spool_files(spool)


async def test_aclose_flushes_what_is_buffered(sink: SwitchableSink, spool: Path) -> None:
    writer = writer_for(sink, spool, batch_size=1000, flush_interval_s=60)
    await writer.start()
    await asyncio.sleep(0.05)
    for i in range(10):
        writer.record(make_record(i))
    assert await sink.stored() == 0
    await writer.aclose()
    assert writer.pending == 0
    await exactly_once(sink, 10)


async def test_flush_returns_once_what_was_recorded_is_stored(
    sink: SwitchableSink, spool: Path
) -> None:
    writer = writer_for(sink, spool, batch_size=1000, flush_interval_s=60)
    for i in range(5):
        writer.record(make_record(i))
    await writer.flush()  # not started yet: flushes by itself
    await exactly_once(sink, 5)
    await writer.start()
    for i in range(5, 2500):
        writer.record(make_record(i))
    await writer.flush()
    await exactly_once(sink, 2500)
    assert writer.pending == 0
    sink.mode = "fail"
    writer.record(make_record(2500))
    await writer.flush()  # the sink failed: the record is in the spool, not in memory
    assert (writer.pending, writer.spooled) == (0, 1)
    await writer.aclose()


async def test_aclose_with_the_sink_down_leaves_everything_in_the_spool(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "fail"
    writer = writer_for(sink, spool, batch_size=1000, flush_interval_s=60)
    await writer.start()
    for i in range(10):
        writer.record(make_record(i))
    await writer.aclose()
    assert writer.pending == 0
    assert sorted(spooled_ids(spool)) == [make_record(i).id for i in range(10)]

    writer.record(make_record(10))  # after close: straight to the spool, not to memory
    assert writer.pending == 0
    assert len(spooled_ids(spool)) == 11

    sink.mode = "ok"
    again = writer_for(sink, spool)
    await again.start()
    await until(lambda: not spool_files(spool))
    await again.aclose()
    await exactly_once(sink, 11)


async def test_aclose_writes_the_spool_and_the_buffer_to_a_sink_that_came_back(
    sink: SwitchableSink, spool: Path
) -> None:
    # The next retry is far off when the process is told to stop: the close tries once more
    # rather than leave everything in the spool until the next start.
    writer = writer_for(sink, spool, retry_interval_s=60, max_retry_interval_s=60)
    await writer.start()
    sink.mode = "fail"
    for i in range(10):
        writer.record(make_record(i))
    await until(lambda: writer.spooling and writer.spooled == 10)
    sink.mode = "ok"
    for i in range(10, 15):
        writer.record(make_record(i))
    await writer.aclose()
    await exactly_once(sink, 15)
    assert not spool_files(spool)


async def test_aclose_gives_a_hanging_sink_a_bounded_time(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "hang"
    writer = writer_for(
        sink, spool, batch_size=10, flush_interval_s=60, write_timeout_s=30, close_timeout_s=0.2
    )
    await writer.start()
    await asyncio.sleep(0.05)
    for i in range(100):
        writer.record(make_record(i))
    started = time.monotonic()
    await writer.aclose()
    assert time.monotonic() - started < 2
    assert len(spooled_ids(spool)) == 100
    assert writer.pending == 0


async def test_a_new_writer_replays_what_a_killed_process_spooled(
    sink: SwitchableSink, spool: Path
) -> None:
    n = 300
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from headrace.accounting.usage import UsageWriter
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_usage_writer import make_record

        class Down:
            async def write_usage(self, records):
                raise ConnectionError("down")

        async def main():
            writer = UsageWriter(Down(), Path({str(spool)!r}), batch_size=64,
                                 flush_interval_s=0.01, retry_interval_s=60)
            await writer.start()
            for i in range({n}):
                writer.record(make_record(i))
            while writer.spooled < {n}:
                await asyncio.sleep(0.01)
            print("spooled", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    crashed = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert crashed.stdout is not None
        stdout = crashed.stdout

        def wait_until_spooled() -> None:
            for line in stdout:  # its log lines come first (structlog's default is stdout)
                if line == b"spooled\n":
                    return
            raise AssertionError(crashed.stderr.read() if crashed.stderr else "no output")

        await asyncio.wait_for(asyncio.to_thread(wait_until_spooled), 30)

        # While that process lives, its file is locked: another writer leaves it alone.
        bystander = writer_for(sink, spool)
        await bystander.start()
        await asyncio.sleep(0.2)
        await bystander.aclose()
        assert await sink.stored() == 0
        assert len(spooled_ids(spool)) == n
    finally:
        crashed.send_signal(signal.SIGKILL)  # no aclose, no cleanup: a crash
        crashed.wait()
        for stream in (crashed.stdout, crashed.stderr):
            if stream is not None:
                stream.close()

    survivor = writer_for(sink, spool)
    await survivor.start()
    await until(lambda: not spool_files(spool))
    await survivor.aclose()
    await exactly_once(sink, n)
    assert survivor.replayed == n


async def test_replay_after_a_crash_mid_replay_does_not_double(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "fail"
    first = writer_for(sink, spool, batch_size=10)
    await first.start()
    for i in range(100):
        first.record(make_record(i))
    await first.aclose()
    # Half of the file made it to the store before "the crash": the file was not deleted.
    sink.mode = "ok"
    await sink.store.write_usage([make_record(i) for i in range(50)])

    second = writer_for(sink, spool, batch_size=10)
    await second.start()
    await until(lambda: not spool_files(spool))
    await second.aclose()
    await exactly_once(sink, 100)


async def test_a_torn_last_line_is_skipped_with_a_warning(
    sink: SwitchableSink, spool: Path
) -> None:
    spool.mkdir()
    whole = b"".join(orjson.dumps(make_record(i)._asdict()) + b"\n" for i in range(3))
    torn = orjson.dumps(make_record(3)._asdict())[:40]
    (spool / "usage-20260101T000000000000Z-1-000001.jsonl").write_bytes(whole + torn)

    writer = writer_for(sink, spool)
    with capture_logs() as logs:
        await writer.start()
        await until(lambda: not spool_files(spool))
        await writer.aclose()
    await exactly_once(sink, 3)
    warnings = [e for e in logs if e["event"] == "usage_spool_torn_line"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"


async def test_a_corrupt_line_is_logged_and_the_rest_replayed(
    sink: SwitchableSink, spool: Path
) -> None:
    spool.mkdir()
    lines = [
        orjson.dumps(make_record(0)._asdict()),
        b"{not json",
        orjson.dumps(make_record(1)._asdict()),
    ]
    (spool / "usage-20260101T000000000000Z-1-000001.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    writer = writer_for(sink, spool)
    with capture_logs() as logs:
        await writer.start()
        await until(lambda: not spool_files(spool))
        await writer.aclose()
    await exactly_once(sink, 2)
    [bad] = [e for e in logs if e["event"] == "usage_spool_bad_line"]
    assert (bad["line_number"], bad["line"]) == (2, "{not json")


async def test_a_record_the_spool_cannot_take_is_logged_whole(
    sink: SwitchableSink, spool: Path
) -> None:
    writer = writer_for(sink, spool, max_buffer=0)  # every record goes to the spool
    spool.rmdir()
    spool.write_bytes(b"")  # a file where the directory should be: every open fails
    record = make_record(7)
    with capture_logs() as logs:
        writer.record(record)
    assert writer.unspooled == 1
    [entry] = [e for e in logs if e["event"] == "usage_record_unspooled"]
    assert entry["log_level"] == "error"
    assert UsageRecord(**orjson.loads(entry["record"])) == record
    spool.unlink()
    await writer.aclose()


async def test_two_writers_on_one_spool_dir_write_separate_files(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "fail"
    # no retry during the test: a retry would close each writer's file and start another
    a = writer_for(sink, spool, batch_size=10, retry_interval_s=60)
    b = writer_for(sink, spool, batch_size=10, retry_interval_s=60)
    await a.start()
    await b.start()
    for i in range(40):
        a.record(make_record(i, "a"))
        b.record(make_record(i, "b"))
    await until(lambda: a.spooled == 40 and b.spooled == 40)
    await a.aclose()
    await b.aclose()

    files = spool_files(spool)
    assert len(files) == 2
    contents = [
        {orjson.loads(line)["id"][0] for line in f.read_bytes().splitlines()} for f in files
    ]
    assert sorted(map(sorted, contents)) == [["a"], ["b"]]

    sink.mode = "ok"
    c = writer_for(sink, spool)
    await c.start()
    await until(lambda: not spool_files(spool))
    await c.aclose()
    await exactly_once(sink, 80)


async def test_spool_files_rotate_by_size(sink: SwitchableSink, spool: Path) -> None:
    sink.mode = "fail"
    writer = writer_for(sink, spool, batch_size=10, spool_file_bytes=2000)
    await writer.start()
    for i in range(100):
        writer.record(make_record(i))
    await until(lambda: writer.spooled == 100)
    await writer.aclose()
    assert len(spool_files(spool)) > 5
    assert sorted(spooled_ids(spool)) == [make_record(i).id for i in range(100)]
    assert not [p for p in spool.iterdir() if p.name.startswith(".")]  # no temporary left

    sink.mode = "ok"
    again = writer_for(sink, spool)
    await again.start()
    await until(lambda: not spool_files(spool))
    await again.aclose()
    await exactly_once(sink, 100)


async def test_spool_file_names_sort_by_time_and_name_the_process(
    sink: SwitchableSink, spool: Path
) -> None:
    sink.mode = "fail"
    writer = writer_for(sink, spool, batch_size=1, spool_file_bytes=1)  # a file per batch
    await writer.start()
    for i in range(3):
        writer.record(make_record(i))
        while writer.spooled <= i:
            await asyncio.sleep(0.01)
    await writer.aclose()

    files = spool_files(spool)
    assert len(files) == 3
    assert all(f"-{os.getpid()}-" in f.name for f in files)
    firsts = [orjson.loads(f.read_bytes())["id"] for f in files]
    assert firsts == [make_record(i).id for i in range(3)]
