"""The HTTP protocol ``headrace serve`` runs: uvicorn's httptools protocol, each answer's head
and body in one system call.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body when
the app sends ``http.response.body``: two ``write`` system calls and two TCP segments for every
answer (the socket has ``TCP_NODELAY``), and a client that wakes for the head and again for the
body. :class:`HttpProtocol` gives uvicorn a transport that holds a write until the next one,
or until the end of the event-loop turn, and sends what it holds with that next write in one
call. A non-streamed answer's body follows its head in the same turn, so the two leave together
at once; a stream's head leaves with its first chunk if that is ready, else at the end of the
turn, as it would have. Nothing waits for more than the rest of the turn it was written in.
docs/adr/0017-one-write-per-answer.md has the measurements.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_Data = bytes | bytearray | memoryview


class TurnWriter(asyncio.Transport):
    """``transport``, with a write held until the next write or the end of the loop turn.

    Held data always leaves before anything written after it, and before ``close`` or
    ``write_eof``; ``abort`` drops it, as it drops the transport's own buffer.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: _Data | None = None

    def write(self, data: _Data) -> None:
        held = self._held
        if held is None:
            # Held past the call: a buffer the caller may change afterwards is copied, as the
            # transport copies what it cannot send at once.
            self._held = data if type(data) is bytes else bytes(data)
            self._loop.call_soon(self._release)
        else:
            self._held = None
            self._transport.writelines((held, data))  # one system call for both

    def writelines(self, list_of_data: Any) -> None:
        self._release()
        self._transport.writelines(list_of_data)

    def _release(self) -> None:
        """Send what is held, if anything (the end of the turn, or before a close)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def write_eof(self) -> None:
        self._release()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self._release()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (len(held) if held is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`TurnWriter`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(TurnWriter(transport, asyncio.get_running_loop()))
