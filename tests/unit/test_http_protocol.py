"""TurnWriter: a write waits for the next one or the end of the loop turn, never longer, and
nothing is reordered or lost on close."""

from __future__ import annotations

import asyncio
from typing import Any

from headrace.cli.http import TurnWriter


class Recording(asyncio.Transport):
    """A transport that records the calls that would be system calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[bytes]]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", [bytes(data)]))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", [bytes(d) for d in list_of_data]))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", []))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", []))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", []))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


def writer() -> tuple[TurnWriter, Recording]:
    transport = Recording()
    return TurnWriter(transport, asyncio.get_running_loop()), transport


async def test_a_head_and_a_body_written_in_one_turn_leave_in_one_call() -> None:
    turn, transport = writer()
    turn.write(b"HTTP/1.1 200 OK\r\n\r\n")
    turn.write(b"{}")
    assert transport.calls == [("writelines", [b"HTTP/1.1 200 OK\r\n\r\n", b"{}"])]
    await asyncio.sleep(0)
    assert len(transport.calls) == 1, "nothing is left to send at the end of the turn"


async def test_a_lone_write_leaves_at_the_end_of_its_turn() -> None:
    turn, transport = writer()
    turn.write(b"head")
    assert transport.calls == []
    assert turn.get_write_buffer_size() == 4
    await asyncio.sleep(0)
    assert transport.calls == [("write", [b"head"])]


async def test_writes_keep_their_order() -> None:
    turn, transport = writer()
    for part in (b"a", b"b", b"c"):
        turn.write(part)
    await asyncio.sleep(0)
    turn.writelines([b"d"])
    turn.write(b"e")
    turn.writelines([b"f"])
    sent = b"".join(b"".join(parts) for _, parts in transport.calls)
    assert sent == b"abcdef"


async def test_close_and_write_eof_send_what_is_held_first() -> None:
    turn, transport = writer()
    turn.write(b"last")
    turn.write_eof()
    assert transport.calls == [("write", [b"last"]), ("write_eof", [])]
    turn.write(b"bye")
    turn.close()
    assert transport.calls[2:] == [("write", [b"bye"]), ("close", [])]
    await asyncio.sleep(0)
    assert len(transport.calls) == 4


async def test_abort_drops_what_is_held_and_a_closed_transport_gets_nothing() -> None:
    turn, transport = writer()
    turn.write(b"dropped")
    turn.abort()
    await asyncio.sleep(0)
    assert transport.calls == [("abort", [])]

    turn, transport = writer()
    turn.write(b"too late")
    transport.closing = True  # the peer went away within the turn
    await asyncio.sleep(0)
    assert transport.calls == []


async def test_a_buffer_changed_after_its_write_is_sent_as_it_was_written() -> None:
    turn, transport = writer()
    buffer = bytearray(b"as written")
    turn.write(buffer)
    buffer[:] = b"changed!!!"
    await asyncio.sleep(0)
    assert transport.calls == [("write", [b"as written"])]
