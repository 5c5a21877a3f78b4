"""A TCP proxy on 127.0.0.1 that a test can cut, stall and restore: a database going away.

    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()          # listens on 127.0.0.1:proxy.port
    await proxy.cut()            # every connection closed (RST); new ones closed at once
    proxy.stall()                # connections stay open, nothing gets through (a black hole)
    proxy.restore()              # forwards again (connections made from now on)
    await proxy.aclose()

The listening socket stays open throughout, so the port cannot be taken meanwhile; a cut
proxy answers a connection by resetting it, which a client sees as the server going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._mode = "forward"  # "forward" | "cut" | "stall"
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0  # accepted while forwarding

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Reset every open connection; connections from now on are reset on arrival."""
        self._mode = "cut"
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stall(self) -> None:
        """Stop forwarding: bytes in either direction are held back, connections stay open."""
        self._mode = "stall"

    def restore(self) -> None:
        self._mode = "forward"

    async def aclose(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "cut":
            _reset(writer)
            return
        self._writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            self._writers.discard(writer)
            _reset(writer)
            return
        self.connections += 1
        self._writers.add(upstream_writer)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(_CHUNK):
                while self._mode == "stall":
                    await asyncio.sleep(0.01)
                if self._mode == "cut":
                    return
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(sink)
            with contextlib.suppress(Exception):
                sink.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a server that went away does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
