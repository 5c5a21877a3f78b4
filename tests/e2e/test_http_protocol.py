"""`headrace serve`'s HTTP protocol on a real socket through uvicorn: an answer's head and body
leave in one write, a stream's head does not wait for its first chunk, keep-alive and
``Connection: close`` behave as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from headrace.cli.http import HttpProtocol
from tests.e2e.conftest import in_process
from tests.sockets import free_port

pytestmark = pytest.mark.e2e

Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """``/json``: a small answer in one piece; ``/stream``: a chunked answer whose first
    chunk comes 0.3 s after its head, then two more in separate turns."""
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/json":
        headers = [(b"x-a", b"1"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(0.3)
    for chunk in (b"one", b"two", b"three"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b""})


class Counted(HttpProtocol):
    """The protocol, with each connection's calls that reach the socket recorded."""

    calls: list[bytes]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        calls = self.calls
        write, writelines = transport.write, transport.writelines
        inside: list[bool] = []  # asyncio's writelines may call write: count the call once

        def counted_write(data: Any) -> None:
            if not inside:
                calls.append(bytes(data))
            write(data)

        def counted_writelines(parts: Any) -> None:
            parts = list(parts)
            calls.append(b"".join(parts))
            inside.append(True)
            try:
                writelines(parts)
            finally:
                inside.pop()

        # The test's loop is asyncio's: its transports take instance attributes.
        transport.write = counted_write  # type: ignore[method-assign]
        transport.writelines = counted_writelines  # type: ignore[method-assign, assignment]
        super().connection_made(transport)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    Counted.calls = []
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=Counted, log_config=None)
    async with in_process(config):
        yield port


def request(path: str, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{connection}\r\n".encode()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.readuntil(b"\r\n\r\n")


async def test_an_answer_leaves_in_one_write_and_keep_alive_still_works(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):  # the same connection, twice
            writer.write(request("/json"))
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"x-a: 1\r\n" in head
            assert await reader.readexactly(11) == b'{"ok":true}'
    finally:
        writer.close()
    assert len(Counted.calls) == 2, Counted.calls  # one per answer, not one per part
    assert all(call.endswith(b'{"ok":true}') for call in Counted.calls)


async def test_a_streams_head_does_not_wait_for_its_first_chunk(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        writer.write(request("/stream"))
        head = await read_head(reader)
        waited = loop.time() - sent
        assert b"transfer-encoding: chunked" in head.lower()
        assert waited < 0.25, f"the head waited {waited:.3f} s for the first chunk"
        async with asyncio.timeout(10):
            body = await reader.readuntil(b"0\r\n\r\n")
        assert body == b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"
    finally:
        writer.close()


async def test_connection_close_sends_the_whole_answer_before_closing(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/json", close=True))
        async with asyncio.timeout(10):
            answer = await reader.read()  # to EOF
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b'{"ok":true}')
    assert len(Counted.calls) == 1
