"""Usage while the PostgreSQL server itself stops and starts again: none lost, none doubled.

The tests beside this one cut a proxy in front of the shared server; this one runs a private
PostgreSQL server (``initdb`` into a temporary directory, its own port and socket directory)
and stops it with ``pg_ctl stop -m fast`` mid-load, as an operator's restart or a failover
does: the server terminates every connection and refuses new ones until it is back. Needs
PostgreSQL's server binaries (``initdb``, ``pg_ctl``); as root they run as the ``postgres``
user. Skipped without them, except in CI (``CI`` set), where their absence fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from headrace.store.sql import SqlStore
from tests.contract.test_usage_replay_pg import (
    assert_exactly_once,
    finish,
    load,
    until,
    writer_for,
)


def _bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian keeps them off ``PATH``)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(versions[-1]).parent if versions else None


def _version(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in Path(path).parent.parent.name.split(".") if p.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of its own: ``start``, ``stop`` (fast shutdown), ``start`` again."""

    def __init__(self, bindir: Path) -> None:
        self._bindir = bindir
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir = Path(tempfile.mkdtemp(prefix="headrace-pg-"))
        if self._as:  # initdb refuses to run as root; the server's user must own the files
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as, str(self._bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            log = self.dir / "data" / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {args[:1]} failed:\n{done.stdout}{done.stderr}{tail}")

    def init(self) -> None:
        data = str(self.dir / "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        data = str(self.dir / "data")
        self._run("pg_ctl", "-D", data, "-l", f"{data}/server.log", "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[PrivatePostgres]:
    bindir = _bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: PostgreSQL's initdb and pg_ctl are missing")
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    pg = PrivatePostgres(bindir)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.remove()


@pytest.fixture
async def sink(server: PrivatePostgres) -> AsyncIterator[SqlStore]:
    """The writer's store on the private server (migrated)."""
    store = SqlStore(server.url)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


async def test_the_server_stopped_and_started_mid_load_loses_and_doubles_nothing(
    sink: SqlStore, server: PrivatePostgres, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    writer = writer_for(sink, spool)
    await writer.start()
    n = 30_000

    await load(writer, 0, 10_000)
    await until(lambda: writer.pending == 0, 30, "the first records stored")
    server.stop()  # terminates every connection; new ones are refused
    await load(writer, 10_000, 20_000)
    await until(lambda: writer.spooling, 30, "the writer noticed the server stopped")
    server.start()
    await load(writer, 20_000, n)
    await finish(writer, spool)

    assert writer.spooled > 0
    assert writer.replayed >= writer.spooled
    assert writer.unspooled == 0
    counts = SqlStore(server.url, migrate_on_start=False)  # connections of its own
    await counts.start()
    try:
        await assert_exactly_once(counts, n)
    finally:
        await counts.aclose()
