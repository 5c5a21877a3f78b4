"""The limiter's Redis connection (headrace.limits.resp) against real Redis servers.

The shared Redis (``HEADRACE_TEST_REDIS_URL``) for pipelining, errors, timeouts, cancellation
and lost connections; a ``redis-server`` of the tests' own for what a URL can ask (a password,
a database, TLS with a certificate made here, a Unix socket, a client name). Every test runs
on asyncio's event loop and on uvloop's, which the gateway runs on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis import Redis
from redis import exceptions as redis_errors

from headrace.limits.resp import RespConnection
from tests.sockets import free_port

NO_REDIS = "set HEADRACE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to run against Redis"
PASSWORD = "s3cret-for-tests"


Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's body on a new event loop of each kind."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


@pytest.fixture
def shared(redis_url: str | None) -> str:
    if not redis_url:
        pytest.skip(NO_REDIS)
    return redis_url


@dataclass
class PrivateRedis:
    port: int
    tls_port: int
    socket: str
    ca: str  # the server's self-signed certificate, which clients trust


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server with a password, a Unix socket and a TLS port (certificate made here)."""
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if not server or not openssl:
        if os.environ.get("CI"):
            pytest.fail("CI needs redis-server and openssl for the limiter connection's tests")
        pytest.skip("needs redis-server and openssl")
    directory = Path(tempfile.mkdtemp(prefix="headrace-redis-"))
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *f"{openssl} req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1".split(),
            *f"-addext subjectAltName=IP:127.0.0.1 -keyout {key} -out {cert}".split(),
        ],
        check=True,
        capture_output=True,
    )
    found = PrivateRedis(free_port(), free_port(), str(directory / "redis.sock"), str(cert))
    process = subprocess.Popen(
        [
            *f"{server} --port {found.port} --bind 127.0.0.1 --requirepass {PASSWORD}".split(),
            *f"--tls-port {found.tls_port} --tls-cert-file {cert} --tls-key-file {key}".split(),
            *f"--tls-ca-cert-file {cert} --tls-auth-clients no".split(),
            *f"--unixsocket {found.socket} --dir {directory} --appendonly no".split(),
            *["--save", ""],
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = Redis(port=found.port, password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_errors.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        yield found
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def test_concurrent_callers_each_get_their_own_reply(run: Run, shared: str) -> None:
    async def main() -> None:
        connection = RespConnection(shared, timeout_s=5.0)
        try:
            replies = await asyncio.gather(*(connection.call("ECHO", f"m{i}") for i in range(300)))
            assert replies == [f"m{i}".encode() for i in range(300)]
        finally:
            await connection.aclose()

    run(main())


def test_an_error_reply_raises_and_the_connection_goes_on(run: Run, shared: str) -> None:
    async def main() -> None:
        connection = RespConnection(shared, timeout_s=5.0)
        key = f"headrace-test:resp:{uuid.uuid4().hex}"
        try:
            with pytest.raises(redis_errors.NoScriptError):
                await connection.call("EVALSHA", "0" * 40, 0)
            await connection.call("SET", key, "not a number", "PX", 10_000)
            with pytest.raises(redis_errors.ResponseError, match="not an integer"):
                await connection.call("INCR", key)
            assert await connection.call("PING") == b"PONG"
            assert await connection.call("GET", key) == b"not a number"
            assert await connection.call("GET", key + ":missing") is None
        finally:
            await connection.call("DEL", key)
            await connection.aclose()

    run(main())


def test_a_late_reply_fails_every_command_on_the_connection_then_it_reconnects(
    run: Run,
    shared: str,
) -> None:
    async def main() -> None:
        connection = RespConnection(shared, timeout_s=0.3)
        key = f"headrace-test:resp:{uuid.uuid4().hex}"
        try:
            started = time.perf_counter()
            blocked = asyncio.ensure_future(connection.call("BLPOP", key, 3))  # answers in 3 s
            behind = asyncio.ensure_future(connection.call("PING"))  # queued behind it
            for call in (blocked, behind):
                with pytest.raises(redis_errors.TimeoutError, match=r"no reply within 0\.3 s"):
                    await call
            assert time.perf_counter() - started < 1.5
            assert await connection.call("PING") == b"PONG"  # a new connection
        finally:
            await connection.aclose()

    run(main())


def test_a_reply_that_came_while_the_event_loop_was_held_up_is_not_late(
    run: Run, shared: str
) -> None:
    # After a stall longer than the timeout, the reply waiting in the socket must be read
    # before the overdue timer breaks the connection (both loops poll I/O first).
    async def main() -> None:
        connection = RespConnection(shared, timeout_s=0.2)
        try:
            assert await connection.call("PING") == b"PONG"  # connected
            reply = asyncio.ensure_future(connection.call("ECHO", "in time"))
            await asyncio.sleep(0)  # the command is written
            time.sleep(0.4)  # the loop held up (a CPU burst): its reply arrives meanwhile
            assert await reply == b"in time"
        finally:
            await connection.aclose()

    run(main())


def test_a_cancelled_callers_reply_is_dropped_and_the_next_reply_is_the_next_callers(
    run: Run,
    shared: str,
) -> None:
    async def main() -> None:
        connection = RespConnection(shared, timeout_s=5.0)
        key = f"headrace-test:resp:{uuid.uuid4().hex}"
        try:
            blocked = asyncio.ensure_future(connection.call("BLPOP", key, "0.2"))
            await asyncio.sleep(0.05)
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
            assert await connection.call("ECHO", "after") == b"after"
        finally:
            await connection.aclose()

    run(main())


def test_a_killed_connection_is_replaced_and_the_command_sent_again(run: Run, shared: str) -> None:
    async def main() -> None:
        name = f"headrace-test-{uuid.uuid4().hex}"
        connection = RespConnection(f"{shared}?client_name={name}", timeout_s=5.0)
        admin = Redis.from_url(shared)
        try:
            assert await connection.call("PING") == b"PONG"
            [client] = [c for c in admin.client_list() if c.get("name") == name]
            admin.client_kill_filter(_id=client["id"])
            assert await connection.call("ECHO", "again") == b"again"
            [replaced] = [c for c in admin.client_list() if c.get("name") == name]
            assert replaced["id"] != client["id"]
        finally:
            admin.close()
            await connection.aclose()

    run(main())


@pytest.mark.parametrize("scheme", ["redis", "rediss", "unix"])
def test_a_url_gives_the_password_database_client_name_and_transport(
    run: Run, private_redis: PrivateRedis, scheme: str
) -> None:
    async def main() -> None:
        name = f"headrace-test-{scheme}"
        url = {
            "redis": f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/2",
            "rediss": f"rediss://:{PASSWORD}@127.0.0.1:{private_redis.tls_port}/2"
            f"?ssl_ca_certs={private_redis.ca}",
            "unix": f"unix://:{PASSWORD}@{private_redis.socket}?db=2",
        }[scheme]
        url += f"{'&' if '?' in url else '?'}client_name={name}"
        connection = RespConnection(url, timeout_s=5.0)
        admin = Redis(port=private_redis.port, password=PASSWORD, db=2)
        try:
            await connection.call("SET", f"written-over-{scheme}", "1")
            assert admin.get(f"written-over-{scheme}") == b"1"  # database 2
            assert [c for c in admin.client_list() if c.get("name") == name]
        finally:
            admin.close()
            await connection.aclose()

    run(main())


def test_a_wrong_password_or_an_untrusted_certificate_fails_to_connect(
    run: Run,
    private_redis: PrivateRedis,
) -> None:
    async def main() -> None:
        wrong = RespConnection(f"redis://:wrong@127.0.0.1:{private_redis.port}/0", timeout_s=5.0)
        with pytest.raises(redis_errors.ResponseError, match="WRONGPASS"):
            await wrong.call("PING")
        await wrong.aclose()
        untrusted = RespConnection(  # the system's CAs, which never signed the test's certificate
            f"rediss://:{PASSWORD}@127.0.0.1:{private_redis.tls_port}/0", timeout_s=5.0
        )
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.call("PING")
        await untrusted.aclose()

    run(main())


def test_url_options_it_would_not_honour_are_refused() -> None:
    with pytest.raises(ValueError, match="socket_timeout"):
        RespConnection("redis://127.0.0.1:6379/0?socket_timeout=1", timeout_s=1.0)
    with pytest.raises(ValueError, match="ssl_ca_certs"):  # TLS options without TLS
        RespConnection("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", timeout_s=1.0)
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        RespConnection("rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes", timeout_s=1.0)
