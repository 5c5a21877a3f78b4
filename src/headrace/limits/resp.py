"""One pipelined Redis connection for the limiter: RESP on an :class:`asyncio.Protocol`.

The limiter sends one command per request on its critical path (and one per settlement), so
what a command costs the gateway above the socket's own write and read is the gateway's cost
of a shared limit. This connection is that cost and little more: a command is encoded by
:mod:`hiredis` (``pack_command``), written to the transport, and answered from its reader in
``data_received``, in the order sent. Every caller shares the one connection (Redis runs
commands one at a time anyway), so there is no pool, no checkout and no lock on the way;
replies of callers that arrive together are read together.
docs/adr/0012-limiter-redis-connection.md says why this is not redis-py's client, whose URL
parsing and exceptions it keeps.

Timeouts: a reply not in within ``timeout_s`` breaks the connection (every command still on it
fails with :class:`redis.exceptions.TimeoutError`, and the next call connects again): a Redis
that does not answer one command answers none behind it. One timer per connection watches
the oldest command's deadline, instead of a timer per command. A caller cancelled while its
command is on the wire leaves the command to run; its reply is read and dropped.

A connection that goes away (Redis restarted, or the client killed) fails what is on it with
:class:`ConnectionLostError`; :meth:`RespConnection.call` then sends its command once more on
a new connection, as redis-py's client does with one retry. Failing to connect is not retried.

URLs are redis-py's: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``,
``ssl_check_hostname``), ``unix:///path?db=N``, and ``client_name`` on any of them. Other
options are refused when the connection is made (:class:`ValueError`), not ignored.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import parse_url

_OPTIONS = {"host", "port", "path", "db", "username", "password", "client_name"}
_TLS_OPTIONS = {
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
}


class ConnectionLostError(redis_errors.ConnectionError):
    """The connection went away with the command on it; the command may or may not have run."""


def encode(*args: str | int | bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    # hiredis's stub types the argument as a tuple of one item; it takes any number.
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


def bulk(value: bytes) -> bytes:
    """One bulk string, for a caller that assembles a command from parts it keeps encoded
    (an array header ``*N\\r\\n`` and ``N`` of these)."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _error(reply: hiredis.ReplyError) -> redis_errors.ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    return redis_errors.ResponseError(message)


class _Protocol(asyncio.Protocol):
    """One connection's commands in flight and their replies, in order."""

    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        # (the caller's future, when its reply is due), oldest first
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Write ``command``; the future gives its reply."""
        future = self._loop.create_future()
        if self.closed or self._transport is None:
            future.set_exception(ConnectionLostError("the connection is closed"))
            return future
        due = self._loop.time() + self._timeout_s
        self._pending.append((future, due))
        self._transport.write(command)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(due, self._check)
        return future

    def close(self) -> None:
        """Close the connection; what is still on it fails (and is not sent again)."""
        self._fail(redis_errors.ConnectionError("the connection was closed"))

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(redis_errors.ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self._fail(redis_errors.ConnectionError("a reply to no command"))
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self._fail(ConnectionLostError(f"the connection to Redis was lost{why}"))

    # -- internals --------------------------------------------------------------------------------

    def _check(self) -> None:
        """The oldest command's reply is due: fail the connection if it has not come."""
        self._watchdog = None
        if not self._pending:
            return
        due = self._pending[0][1]
        if self._loop.time() >= due:
            self._fail(redis_errors.TimeoutError(f"no reply within {self._timeout_s} s"))
        else:
            self._watchdog = self._loop.call_at(due, self._check)

    def _fail(self, error: Exception) -> None:
        """Close the connection and fail every command still on it with ``error``."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.abort()
        pending, self._pending = self._pending, collections.deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)
                future.exception()  # no caller may await it (a greeting after a failed one)


class RespConnection:
    """A Redis connection shared by every caller, opened on first use (see the module doc)."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        options: dict[str, Any] = dict(parse_url(url))
        options.pop("connection_class", None)
        tls = urlsplit(url).scheme == "rediss"
        unknown = set(options) - _OPTIONS - (_TLS_OPTIONS if tls else set())
        if unknown:
            raise ValueError(
                f"the limiter's Redis URL has options it does not support: {sorted(unknown)}"
            )
        self._options = options
        self._ssl = _tls_context(options) if tls else None
        self._timeout_s = timeout_s
        self.where: str = options.get("path") or (
            f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
        )
        self._protocol: _Protocol | None = None
        self._opening = asyncio.Lock()

    async def call(self, *args: str | int | bytes) -> Any:
        """Send one command and return its reply; raise redis-py's exceptions."""
        return await self.send(encode(*args))

    async def send(self, command: bytes) -> Any:
        """:meth:`call` with the command already encoded (see :func:`encode`)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._open()
        try:
            return await protocol.send(command)
        except ConnectionLostError:  # gone stale (a Redis restart): once more, on a new one
            return await (await self._open()).send(command)

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def _open(self) -> _Protocol:
        """The open connection, or a new one: connected, authenticated, its database chosen."""
        async with self._opening:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            self._protocol = None
            loop = asyncio.get_running_loop()
            options = self._options
            protocol: _Protocol | None = None
            try:
                async with asyncio.timeout(self._timeout_s):
                    if options.get("path"):
                        _, protocol = await loop.create_unix_connection(
                            lambda: _Protocol(self._timeout_s), options["path"]
                        )
                    else:
                        host = options.get("host", "localhost")
                        _, protocol = await loop.create_connection(
                            lambda: _Protocol(self._timeout_s),
                            host,
                            options.get("port", 6379),
                            ssl=self._ssl,
                            server_hostname=host if self._ssl is not None else None,
                        )
                    await self._greet(protocol)
            except TimeoutError:
                if protocol is not None:
                    protocol.close()
                raise redis_errors.TimeoutError(
                    f"no connection within {self._timeout_s} s"
                ) from None
            except BaseException:
                if protocol is not None:
                    protocol.close()
                raise
            self._protocol = protocol
            return protocol

    async def _greet(self, protocol: _Protocol) -> None:
        """``AUTH``, ``SELECT`` and ``CLIENT SETNAME`` as the URL asks, pipelined."""
        options = self._options
        commands: list[list[str | int]] = []
        if options.get("password") is not None:
            user = options.get("username")
            commands.append(["AUTH", *([user] if user else []), options["password"]])
        if options.get("db"):
            commands.append(["SELECT", options["db"]])
        if options.get("client_name"):
            commands.append(["CLIENT", "SETNAME", options["client_name"]])
        replies = [protocol.send(encode(*command)) for command in commands]
        for reply in replies:
            await reply


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context a ``rediss://`` URL's ``ssl_*`` options describe (redis-py's meaning)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    requirement = str(options.get("ssl_cert_reqs", "required")).lower()
    modes = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
    if requirement not in modes:
        raise ValueError(f"ssl_cert_reqs must be one of {sorted(modes)}, not {requirement!r}")
    check = options.get("ssl_check_hostname")
    context.check_hostname = (
        requirement != "none" if check is None else str(check).lower() in ("1", "true", "yes")
    )
    context.verify_mode = modes[requirement]
    return context
