"""The usage spool's files on their own, without a writer: what goes in comes back, a bad or
torn line is logged and skipped, and a file another descriptor holds is left alone."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import structlog

from headrace.accounting.spool import Spool, decode, encode, load, remove
from headrace.domain import UsageRecord


def record(i: int) -> UsageRecord:
    return UsageRecord(
        id=f"u{i}",
        request_id=f"req-{i}",
        created_at=1_700_000_000.0 + i,
        operation="chat",
        key_id="key_1",
        team_id=None if i % 2 else "team_1",
        model="m",
        requested_model="m",
        deployment="d",
        prompt_tokens=i,
        cost_micro_usd=10 * i,
        error=None if i % 3 else "UpstreamError",
    )


def test_records_come_back_as_they_went_in(tmp_path: Path) -> None:
    path = tmp_path / "usage-x.jsonl"
    path.write_bytes(encode([record(1), record(2)]) + encode([record(3)]))
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every record ends its line
    assert decode(path, lines, 0) == [record(1), record(2), record(3)]


def test_a_bad_line_is_logged_with_its_number_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "usage-x.jsonl"
    lines = [encode([record(1)]).rstrip(), b"{not json", b"", b'{"id": "no other fields"}']
    with structlog.testing.capture_logs() as logs:
        assert decode(path, lines, 10) == [record(1)]
    assert [(e["event"], e["line_number"]) for e in logs] == [
        ("usage_spool_bad_line", 12),
        ("usage_spool_bad_line", 14),
    ]


async def test_a_closed_file_is_loaded_locked_and_a_torn_last_line_dropped(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, max_file_bytes=1 << 20)
    spool.append(encode([record(1), record(2)]))
    assert spool.closed_files() == []  # the file this process appends to is its own
    await spool.rotate()
    [path] = spool.closed_files()
    with path.open("ab") as file:
        file.write(b'{"id": "u3", "request')  # a write cut short by a crash
    with structlog.testing.capture_logs() as logs:
        loaded = await load(path)
    assert loaded is not None
    fd, lines = loaded
    try:
        assert await load(path) is None  # locked: another replay is on it
        assert decode(path, lines, 0) == [record(1), record(2)]
    finally:
        os.close(fd)
    assert [e["event"] for e in logs] == ["usage_spool_torn_line"]
    remove(path)
    assert spool.closed_files() == []
    assert await load(path) is None  # gone


async def test_the_file_being_written_is_locked_against_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_file_bytes=1 << 20)
    spool.append(encode([record(1)]))
    [path] = tmp_path.glob("usage-*.jsonl")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert await load(path) is None
    finally:
        os.close(fd)
    await spool.close()
    loaded = await load(path)
    assert loaded is not None
    os.close(loaded[0])


async def test_a_full_file_is_retired_and_the_next_append_opens_another(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_file_bytes=1)
    spool.append(encode([record(1)]))
    spool.append(encode([record(2)]))
    await spool.sync()  # fsyncs and closes the retired files
    files = spool.closed_files()
    assert len(files) == 2
    assert files == sorted(files)
    assert [decode(p, p.read_bytes().split(b"\n")[:-1], 0) for p in files] == [
        [record(1)],
        [record(2)],
    ]
