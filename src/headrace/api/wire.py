"""OpenAI wire shapes for request validation, and their conversion to domain types.

Validation checks the fields Headrace reads or that OpenAI would reject; everything else is
allowed (``extra="allow"``) and forwarded untouched. The validated model is used only to
check; the client's own JSON object travels on as ``body``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError

from headrace.domain import ChatRequest, EmbeddingRequest, EmbeddingResponse, JobKind
from headrace.errors import InvalidRequestError, ValidationFailedError


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: StrictBool = False


class ChatCompletionBody(_Open):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None


class EmbeddingBody(_Open):
    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None


_chat = TypeAdapter(ChatCompletionBody)
_embeddings = TypeAdapter(EmbeddingBody)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[str]", "list[dict[str,any]]") or "[" in str(part):
            continue  # union branch names, not fields
        else:
            path += f".{part}" if path else str(part)
    return path


def invalid(exc: ValidationError) -> ValidationFailedError:
    first = exc.errors()[0]
    param = _field_path(first["loc"])
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    else:
        message = f"Invalid value for '{param}': {first['msg']}."
        code = "invalid_value"
    return ValidationFailedError(message, param=param, code=code)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def chat_request(body: Any) -> ChatRequest:
    raw = _object(body)
    try:
        parsed = _chat.validate_python(raw)
    except ValidationError as exc:
        raise invalid(exc) from None
    return ChatRequest(
        model=parsed.model,
        messages=raw["messages"],
        body=raw,
        stream=parsed.stream,
        include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
        max_tokens=parsed.max_completion_tokens or parsed.max_tokens,
    )


def embedding_request(body: Any) -> tuple[EmbeddingRequest, str]:
    """The domain request and the encoding the client wants back (``float``/``base64``)."""
    raw = _object(body)
    try:
        parsed = _embeddings.validate_python(raw)
    except ValidationError as exc:
        if any(isinstance(x, int) for x in raw.get("input") or []):
            raise InvalidRequestError(
                "Token-array inputs are not supported; send the text instead.", param="input"
            ) from None
        raise invalid(exc) from None
    inputs = [parsed.input] if isinstance(parsed.input, str) else parsed.input
    for i, text in enumerate(inputs):
        if not text:
            raise ValidationFailedError(
                f"Invalid value for 'input[{i}]': the input must not be empty.",
                param=f"input[{i}]" if isinstance(parsed.input, list) else "input",
            )
    request = EmbeddingRequest(
        model=parsed.model,
        inputs=inputs,
        body={k: v for k, v in raw.items() if k != "encoding_format"},
        dimensions=parsed.dimensions,
    )
    return request, parsed.encoding_format


def _encode(vector: Sequence[float], encoding: str) -> object:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def embedding_body(answer: EmbeddingResponse, encoding: str) -> dict[str, Any]:
    """OpenAI's embeddings response (vectors may be numpy: dump with OPT_SERIALIZE_NUMPY)."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
            for i, vector in enumerate(answer.vectors)
        ],
        "model": answer.model,
        "usage": {
            "prompt_tokens": answer.usage.prompt_tokens,
            "total_tokens": answer.usage.prompt_tokens,
        },
    }


def validate_job(kind: JobKind, body: Mapping[str, Any]) -> None:
    """Check a job's request body as the synchronous route would (400 naming the field)."""
    if kind is JobKind.CHAT:
        chat_request(dict(body))
    else:
        embedding_request(dict(body))
