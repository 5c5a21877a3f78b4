"""The mock's deterministic answers, read from and rendered to OpenAI's wire format.

Token counts are whitespace words: a prompt's ``prompt_tokens`` is the number of words in
the text of all its messages, and each word of an answer is one completion token. A chat
answer is ``"mock answer:"`` followed by the words of the last user message, repeated as
needed, cut to the configured number of output tokens or ``max_tokens``, whichever is
smaller. Embeddings are unit vectors derived from a hash of the input, so equal inputs
get equal vectors. Plain dicts and orjson only: this is the hot path of the benchmarks.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

__all__ = [
    "DONE_EVENT",
    "MALFORMED_EVENT",
    "MAX_DIMENSIONS",
    "ChatAnswer",
    "EmbeddingAnswer",
    "error_body",
    "model_body",
    "models_body",
    "read_chat",
    "read_embeddings",
]

_PREFIX = ("mock", "answer:")
_FILLER = ("nothing", "to", "echo")
MAX_DIMENSIONS = 8192
DONE_EVENT = b"data: [DONE]\n\n"
# An SSE event whose data is not JSON; what a ``malformed`` stream sends after its first event.
MALFORMED_EVENT = b'data: {"id": "chatcmpl-mock", "choices": [{"delta": \n\n'


def _text_of(content: object) -> str:
    """The text of a message's ``content``: a string, or the ``text`` of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _optional_int(body: Mapping[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    """The answer to one chat completion request, ready to render as JSON or SSE."""

    model: str
    words: tuple[str, ...]
    prompt_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def usage(self) -> dict[str, int]:
        completion = len(self.words)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def completion_body(self, completion_id: str, created: int) -> bytes:
        """The ``chat.completion`` JSON document."""
        message = {"role": "assistant", "content": self.text, "refusal": None}
        return orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                    }
                ],
                "usage": self.usage(),
            }
        )

    def stream_parts(self, completion_id: str, created: int) -> tuple[list[bytes], bytes]:
        """The SSE stream as ``(writes, tail)``.

        ``writes[0]`` is the role chunk with the first word, each further write is one
        word; the server waits ``ttft_ms`` before the first write and ``inter_chunk_ms``
        before each other one. ``tail`` is the finish chunk, the usage chunk when
        ``stream_options.include_usage`` was set, and ``[DONE]``: it goes with the last
        write, and a cut stream never sends it.
        """
        head: dict[str, object] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model,
        }
        extra: dict[str, object] = {"usage": None} if self.include_usage else {}

        def event(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + orjson.dumps({**head, "choices": [choice], **extra}) + b"\n\n"

        first = event({"role": "assistant", "content": ""})
        pieces = [word if i == 0 else " " + word for i, word in enumerate(self.words)]
        writes = [event({"content": piece}) for piece in pieces] or [b""]
        writes[0] = first + writes[0]
        tail = event({}, self.finish_reason)
        if self.include_usage:
            usage = {**head, "choices": [], "usage": self.usage()}
            tail += b"data: " + orjson.dumps(usage) + b"\n\n"
        return writes, tail + DONE_EVENT


def read_chat(body: object, output_tokens: int) -> ChatAnswer:
    """Read a chat completion request body; ``ValueError`` says what is wrong with it.

    Of the request only ``model``, ``messages``, ``max_tokens`` (or
    ``max_completion_tokens``), ``stream`` and ``stream_options`` matter.
    """
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of chat messages")
    prompt_tokens = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object with 'role' and 'content'")
        text = _text_of(message.get("content"))
        prompt_tokens += len(text.split())
        if message.get("role") == "user":
            last_user = text
    limit = _optional_int(body, "max_completion_tokens")
    if limit is None:
        limit = _optional_int(body, "max_tokens")
    count = output_tokens if limit is None else min(output_tokens, limit)
    source = last_user.split() or list(_FILLER)
    words = tuple(itertools.islice(itertools.chain(_PREFIX, itertools.cycle(source)), count))
    options = body.get("stream_options")
    model = body.get("model")
    return ChatAnswer(
        model=model if isinstance(model, str) else "mock-model",
        words=words,
        prompt_tokens=prompt_tokens,
        finish_reason="length" if count < output_tokens else "stop",
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


@dataclass(frozen=True, slots=True)
class EmbeddingAnswer:
    """The answer to one embeddings request: one vector per input, in input order."""

    model: str
    keys: tuple[bytes, ...]
    prompt_tokens: int
    dimensions: int
    as_base64: bool

    def body(self) -> bytes:
        """The ``list`` of ``embedding`` objects, floats or base64 little-endian float32."""
        data: list[dict[str, object]] = []
        for index, key in enumerate(self.keys):
            vector = _unit_vector(key, self.dimensions)
            encoded: object = vector
            if self.as_base64:
                packed = struct.pack(f"<{self.dimensions}f", *vector)
                encoded = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        return orjson.dumps({"object": "list", "data": data, "model": self.model, "usage": usage})


def read_embeddings(body: object, default_dimensions: int) -> EmbeddingAnswer:
    """Read an embeddings request body; ``ValueError`` says what is wrong with it.

    ``input`` may be a string, a list of strings, a token array (list of ints) or a list
    of token arrays. A token array counts one token per element.
    """
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    raw = body.get("input")
    items: list[object]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise ValueError("input must be a string, a list of strings, or token arrays")
    keys: list[bytes] = []
    tokens = 0
    for item in items:
        if isinstance(item, str):
            keys.append(item.encode())
            tokens += len(item.split())
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            keys.append(b"tokens:" + orjson.dumps(item))
            tokens += len(item)
        else:
            raise ValueError("each input must be a string or a list of integer tokens")
    dimensions = _optional_int(body, "dimensions") or default_dimensions
    if dimensions > MAX_DIMENSIONS:
        raise ValueError(f"dimensions is {dimensions}; the mock gives at most {MAX_DIMENSIONS}")
    model = body.get("model")
    return EmbeddingAnswer(
        model=model if isinstance(model, str) else "mock-embedding",
        keys=tuple(keys),
        prompt_tokens=tokens,
        dimensions=dimensions,
        as_base64=body.get("encoding_format") == "base64",
    )


def _unit_vector(key: bytes, dimensions: int) -> list[float]:
    """A unit-length vector that depends only on ``key`` and ``dimensions``."""
    raw = hashlib.shake_256(key).digest(2 * dimensions)
    ints = struct.unpack(f"<{dimensions}h", raw)
    norm = math.sqrt(sum(i * i for i in ints)) or 1.0
    return [i / norm for i in ints]


def models_body(models: tuple[str, ...]) -> bytes:
    """``GET /v1/models``: every configured model id."""
    return orjson.dumps({"object": "list", "data": [_model(name) for name in models]})


def model_body(name: str) -> bytes:
    """``GET /v1/models/{name}``: the mock serves any model name it is asked for."""
    return orjson.dumps(_model(name))


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "headrace-mock"}


def error_body(message: str, type_: str, code: str | None = None) -> bytes:
    """OpenAI's error document: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
