"""A PostgreSQL server of a test's own, to stop and start again (tests that need an outage).

``initdb`` into a temporary directory, its own port and socket directory; ``stop`` is
``pg_ctl stop -m fast``, as an operator's restart or a failover does: the server terminates
every connection and refuses new ones until it is started again. Needs PostgreSQL's server
binaries (``initdb``, ``pg_ctl``); as root they run as the ``postgres`` user. The ``server``
fixture skips without them, except in CI (``CI`` set), where their absence fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sockets import free_port


def _bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian keeps them off ``PATH``)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(versions[-1]).parent if versions else None


def _version(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in Path(path).parent.parent.name.split(".") if p.isdigit())


class PrivatePostgres:
    """A PostgreSQL server of its own: ``start``, ``stop`` (fast shutdown), ``start`` again."""

    def __init__(self, bindir: Path) -> None:
        self._bindir = bindir
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir = Path(tempfile.mkdtemp(prefix="headrace-pg-"))
        if self._as:  # initdb refuses to run as root; the server's user must own the files
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
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
def private_postgres() -> Iterator[PrivatePostgres]:
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
