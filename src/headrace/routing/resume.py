"""Resuming a stream that an upstream cut after output reached the client.

A cut stream cannot simply be retried: the client already holds a prefix of the answer. It
can be *resumed* when a retry reproduces that prefix — deterministic decoding, or an upstream
that answers identically — by skipping the retry's chunks until they cover what was sent,
checking that they match it exactly, and passing on the rest. If the retry diverges, or the
stream carried tool calls, logprobs or several choices, resumption is impossible and the
client gets the original error (a *partial* failure, see :mod:`headrace.routing.classify`).
"""

from __future__ import annotations

from typing import Any

from headrace.domain import ChatChunk


class SpliceMismatchError(Exception):
    """The retried stream does not reproduce what the client already received."""


def _only_choice(body: dict[str, Any]) -> dict[str, Any] | None:
    choices = body.get("choices")
    if not choices:
        return None
    choice: dict[str, Any] = choices[0]
    return choice


class Transcript:
    """What reached the client so far: the text of choice 0 and whether it is resumable."""

    def __init__(self) -> None:
        self.started = False
        self.text = ""
        self.resumable = True
        self.stream_id: str | None = None

    def record(self, chunk: ChatChunk) -> None:
        body = chunk.body
        if not self.started:
            self.started = True
            self.stream_id = body.get("id")
        choices = body.get("choices") or []
        if len(choices) > 1:
            self.resumable = False
            return
        choice = _only_choice(body)
        if choice is None:
            return
        delta = choice.get("delta") or {}
        if (
            choice.get("index", 0) != 0
            or choice.get("logprobs")
            or ("tool_calls" in delta or "function_call" in delta)
        ):
            self.resumable = False
        self.text += delta.get("content") or ""


class Splicer:
    """Filters a retried stream so that the client sees one seamless answer."""

    def __init__(self, sent: Transcript) -> None:
        self._sent = sent.text
        self._id = sent.stream_id
        self._seen = ""
        self._caught_up = False

    def _same_id(self, body: dict[str, Any]) -> dict[str, Any]:
        return body if self._id is None else {**body, "id": self._id}

    def feed(self, chunk: ChatChunk) -> ChatChunk | None:
        """The chunk to pass on (possibly trimmed), or None to drop it.

        Raises :class:`SpliceMismatchError` when the retry diverges from what was sent.
        """
        body = chunk.body
        choice = _only_choice(body)
        if self._caught_up or choice is None:
            return ChatChunk(self._same_id(body), chunk.usage)
        delta = choice.get("delta") or {}
        self._seen += delta.get("content") or ""
        if len(self._seen) <= len(self._sent):
            if not self._sent.startswith(self._seen) or choice.get("finish_reason"):
                raise SpliceMismatchError("the retried answer differs from the one being sent")
            return None
        if not self._seen.startswith(self._sent):
            raise SpliceMismatchError("the retried answer differs from the one being sent")
        self._caught_up = True
        rest = {k: v for k, v in delta.items() if k != "role"}
        rest["content"] = self._seen[len(self._sent) :]
        trimmed = {**body, "choices": [{**choice, "delta": rest}]}
        return ChatChunk(self._same_id(trimmed), chunk.usage)
