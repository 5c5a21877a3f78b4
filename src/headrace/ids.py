"""Ids unique across processes and restarts, drawn without a system call each.

A ``uuid4()`` per id asks the kernel for 16 random bytes and builds a ``UUID`` object. That is
cheap back to back, but at a steady rate each request runs on cold caches: 5 ms apart, one
``uuid4().hex`` cost 34 µs of CPU at the median (103 on average), against 5 (33) for the
prefix and counter below (bench/README.md, "Ids without a system call, and what a cold
request costs").

So an id is a random prefix drawn once per process (80 bits from :mod:`secrets`) followed by
a counter. Two processes draw the same prefix with a chance of 2^-80; a child forked from a
process that has drawn one draws its own, so processes forked from one parent never count
from the same prefix. Usage records rely on this: their id is what makes a replay from the
spool insert each of them exactly once.
"""

from __future__ import annotations

import itertools
import os
import secrets


class _Source:
    """The process's prefix and counter; drawn again in a forked child."""

    __slots__ = ("counter", "prefix")

    def __init__(self) -> None:
        self.prefix = ""
        self.counter = itertools.count()
        self.draw()

    def draw(self) -> None:
        self.prefix = secrets.token_hex(10)
        self.counter = itertools.count()


_source = _Source()
os.register_at_fork(after_in_child=_source.draw)


def unique_id() -> str:
    """32 lowercase hex characters (more after 2^48 ids): the process's prefix and a counter."""
    return f"{_source.prefix}{next(_source.counter):012x}"
