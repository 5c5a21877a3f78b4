"""OpenAI chat completions ⇄ Anthropic Messages: pure translation, no I/O.

Request, OpenAI → Anthropic (``POST /v1/messages``)::

    messages[role=system|developer]      → top-level ``system`` (texts joined by a blank line,
                                           wherever they appear in the conversation)
    messages[role=user] text parts       → ``text`` blocks (a plain string stays a string)
    messages[role=user] image_url parts  → ``image`` blocks: ``data:<type>;base64,…`` URLs →
                                           ``{"type": "base64", "media_type", "data"}``;
                                           http(s) URLs → ``{"type": "url", "url"}``
    messages[role=assistant] content     → ``text`` blocks (``refusal`` parts become text)
    messages[role=assistant] tool_calls  → ``tool_use`` blocks (``arguments`` JSON → ``input``)
    messages[role=tool]                  → a user message of ``tool_result`` blocks; consecutive
                                           tool messages share one user message
    tools[type=function]                 → ``{"name", "description", "input_schema"}``
    tool_choice auto|none|required       → ``{"type": "auto"|"none"|"any"}``
    tool_choice {"function": {"name"}}   → ``{"type": "tool", "name"}``
    parallel_tool_calls=false            → ``tool_choice.disable_parallel_tool_use = true``
    max_completion_tokens | max_tokens   → ``max_tokens`` (required by Anthropic; the
                                           deployment's default when the client sent neither)
    temperature, top_p, top_k            → the same fields (Anthropic rejects temperature > 1)
    stop (string or list)                → ``stop_sequences``
    user                                 → ``metadata.user_id``

Rejected with :class:`~headrace.errors.InvalidRequestError`, because Anthropic cannot do them
and ignoring them would change the answer's shape: ``n`` > 1, ``logprobs``/``top_logprobs``,
``response_format`` other than ``text``, audio output (``audio``, ``modalities``), the legacy
``functions``/``function_call`` and ``function`` role, tools other than functions, and content
parts other than text and images (``input_audio``, ``file``).

Dropped silently (hints or OpenAI-only features with no Anthropic equivalent):
``frequency_penalty``, ``presence_penalty``, ``seed``, ``logit_bias``, ``service_tier``,
``store``, OpenAI's ``metadata``, ``reasoning_effort``, ``prediction``, ``stream_options``
(usage is always reported), ``web_search_options``, message ``name``, image ``detail``, tool
``strict``, and any field Headrace does not know (Anthropic rejects unknown fields).

Response, Anthropic → OpenAI ``chat.completion``::

    content[type=text]         → ``message.content`` (joined; ``None`` with only tool calls)
    content[type=tool_use]     → ``message.tool_calls[{id, type: function, function:
                                 {name, arguments: JSON string}}]``
    content[other types]       → dropped (``thinking``, ``redacted_thinking``, server tools)
    stop_reason                → ``finish_reason``: see :data:`FINISH_REASONS`
    usage                      → ``prompt_tokens`` = input + cache read + cache creation
                                 tokens; ``cached_tokens`` = cache read; ``completion_tokens``
                                 = output (cache writes are not priced apart)

Streams: see :class:`StreamTranslator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from headrace.domain import ChatChunk, JsonObject, Usage
from headrace.errors import InvalidRequestError

FINISH_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic ``stop_reason`` → OpenAI ``finish_reason``; anything else becomes ``stop``."""

_TOOL_CHOICES: Mapping[str, str] = {"auto": "auto", "none": "none", "required": "any"}


# -- reading untrusted JSON ------------------------------------------------------------------


def _obj(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Sequence[object]:
    return value if isinstance(value, list) else []


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _invalid(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message + " (Anthropic deployment)", param=param)


# -- request ---------------------------------------------------------------------------------


def messages_request(
    body: Mapping[str, object], *, model: str, default_max_tokens: int, stream: bool
) -> JsonObject:
    """Translate an OpenAI chat-completions body into an Anthropic Messages body.

    Raises :class:`InvalidRequestError` naming the offending parameter for what Anthropic
    cannot express (see the module docstring).
    """
    _reject_unsupported(body)
    system, messages = _conversation(_list(body.get("messages")))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out: JsonObject = {
        "model": model,
        "max_tokens": max_tokens if isinstance(max_tokens, int) else default_max_tokens,
        "messages": messages,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = _list(body.get("tools"))
    if tools:
        out["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), bool(tools))
    if choice is not None:
        out["tool_choice"] = choice
    if stream:
        out["stream"] = True
    return out


def _conversation(raw_messages: Sequence[object]) -> tuple[list[str], list[JsonObject]]:
    """OpenAI messages → (system texts, Anthropic messages)."""
    system: list[str] = []
    messages: list[JsonObject] = []
    for i, raw in enumerate(raw_messages):
        message = _obj(raw)
        role = message.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.append(_plain_text(message.get("content"), where))
        elif role == "user":
            messages.append({"role": "user", "content": _user_content(message, where)})
        elif role == "assistant":
            content = _assistant_content(message, where)
            if content:
                messages.append({"role": "assistant", "content": content})
        elif role == "tool":
            result = _tool_result(message, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "user" and _all_tool_results(last):
                last["content"].append(result)
            else:
                messages.append({"role": "user", "content": [result]})
        else:
            raise _invalid(f"Messages with role {role!r} are not supported; use 'tool'.", where)
    return system, messages


def _reject_unsupported(body: Mapping[str, object]) -> None:
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise _invalid("Anthropic returns one choice per request; send n=1.", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _invalid("Anthropic returns no log probabilities; drop 'logprobs'.", "logprobs")
    response_format = _obj(body.get("response_format"))
    if response_format.get("type", "text") != "text":
        raise _invalid(
            "Anthropic has no JSON mode; describe the format in the prompt or use a tool.",
            "response_format",
        )
    modalities = _list(body.get("modalities"))
    if body.get("audio") is not None or "audio" in modalities:
        raise _invalid("Anthropic produces no audio.", "modalities")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise _invalid(f"'{legacy}' is deprecated; use 'tools' and 'tool_choice'.", legacy)


def _plain_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(_list(content)):
        p = _obj(part)
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise _invalid("Only text parts are allowed here.", f"{where}.content[{j}]")
        texts.append(str(p["text"]))
    return "\n\n".join(texts)


def _user_content(message: Mapping[str, object], where: str) -> str | list[JsonObject]:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return [_part(part, f"{where}.content[{j}]") for j, part in enumerate(_list(content))]


def _part(part: object, where: str) -> JsonObject:
    p = _obj(part)
    kind = p.get("type")
    if kind in ("text", "refusal"):
        text = p.get(kind)
        if not isinstance(text, str):
            raise _invalid(f"A {kind} part needs a string '{kind}'.", where)
        return {"type": "text", "text": text}
    if kind == "image_url":
        return _image(p.get("image_url"), where)
    raise _invalid(f"Content parts of type {kind!r} are not supported.", where)


def _image(image_url: object, where: str) -> JsonObject:
    url = image_url if isinstance(image_url, str) else _obj(image_url).get("url")
    if not isinstance(url, str):
        raise _invalid("An image_url part needs 'image_url.url'.", where)
    if url.startswith("data:"):
        header, sep, data = url[len("data:") :].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise _invalid("Image data URLs must look like data:image/png;base64,<data>.", where)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _invalid("Image URLs must be http(s) or base64 data URLs.", where)


def _assistant_content(message: Mapping[str, object], where: str) -> str | list[JsonObject]:
    content = message.get("content")
    calls = _list(message.get("tool_calls"))
    if isinstance(content, str) and not calls:
        return content
    blocks: list[JsonObject] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    else:
        blocks.extend(_part(p, f"{where}.content[{j}]") for j, p in enumerate(_list(content)))
    blocks.extend(_tool_use(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls))
    return blocks


def _tool_use(call: object, where: str) -> JsonObject:
    c = _obj(call)
    function = _obj(c.get("function"))
    name, call_id = function.get("name"), c.get("id")
    if c.get("type", "function") != "function" or not isinstance(name, str):
        raise _invalid("Tool calls must be functions with a name.", where)
    if not isinstance(call_id, str):
        raise _invalid("Tool calls need an 'id'.", f"{where}.id")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _invalid("Tool call arguments must be a JSON object.", f"{where}.function.arguments")
    return {"type": "tool_use", "id": call_id, "name": name, "input": parsed}


def _tool_result(message: Mapping[str, object], where: str) -> JsonObject:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise _invalid("Tool messages need a 'tool_call_id'.", f"{where}.tool_call_id")
    content = message.get("content")
    result: JsonObject = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        result["content"] = content
    else:
        result["content"] = [
            _part(p, f"{where}.content[{j}]") for j, p in enumerate(_list(content))
        ]
    return result


def _all_tool_results(message: JsonObject) -> bool:
    content = message["content"]
    return isinstance(content, list) and all(b.get("type") == "tool_result" for b in content)


def _tool(tool: object, where: str) -> JsonObject:
    t = _obj(tool)
    function = _obj(t.get("function"))
    name = function.get("name")
    if t.get("type") != "function" or not isinstance(name, str):
        raise _invalid("Only function tools with a name are supported.", where)
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    out: JsonObject = {"name": name, "input_schema": schema}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: object, parallel: object, has_tools: bool) -> JsonObject | None:
    out: JsonObject | None
    if choice is None:
        out = None
    elif isinstance(choice, str) and choice in _TOOL_CHOICES:
        out = {"type": _TOOL_CHOICES[choice]}
    elif _obj(choice).get("type") == "function" and isinstance(
        name := _obj(_obj(choice).get("function")).get("name"), str
    ):
        out = {"type": "tool", "name": name}
    else:
        raise _invalid(
            "tool_choice must be auto, none, required or a named function.", "tool_choice"
        )
    if parallel is False and has_tools and (out is None or out["type"] != "none"):
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


# -- response --------------------------------------------------------------------------------


def usage_of(usage: object) -> Usage:
    """Anthropic ``usage`` → :class:`Usage` (cache reads and writes count as prompt tokens)."""
    u = _obj(usage)
    cache_read = _int(u.get("cache_read_input_tokens"))
    prompt = _int(u.get("input_tokens")) + cache_read + _int(u.get("cache_creation_input_tokens"))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=_int(u.get("output_tokens")),
        cached_tokens=cache_read,
    )


def finish_reason(stop_reason: object) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def chat_completion(message: Mapping[str, object], *, created: int) -> tuple[JsonObject, Usage]:
    """An Anthropic ``message`` object → an OpenAI ``chat.completion`` and its usage."""
    texts: list[str] = []
    calls: list[JsonObject] = []
    for raw in _list(message.get("content")):
        block = _obj(raw)
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(str(block["text"]))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    reply: JsonObject = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        reply["tool_calls"] = calls
    usage = usage_of(message.get("usage"))
    body: JsonObject = {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": finish_reason(message.get("stop_reason")),
                "logprobs": None,
            }
        ],
        "usage": usage.to_openai(),
    }
    return body, usage


# -- stream ----------------------------------------------------------------------------------


class StreamTranslator:
    """Anthropic stream events → OpenAI ``chat.completion.chunk`` chunks, one event at a time.

    ::

        message_start                      → nothing yet (id, model, input usage recorded)
        content_block_start text           → role chunk (first block only), text if any
        content_block_start tool_use       → role chunk (first block only), then
                                             ``delta.tool_calls[{index, id, type, function:
                                             {name, arguments: ""}}]``
        content_block_delta text_delta     → ``delta.content``
        content_block_delta input_json_delta → ``delta.tool_calls[{index, function:
                                             {arguments: partial_json}}]``
        message_delta                      → nothing (stop_reason and output usage recorded)
        message_stop                       → finish chunk, then a usage-only chunk
                                             (``choices: []``, :attr:`ChatChunk.usage` set)
        ping, content_block_stop, thinking/signature/citation deltas, unknown events → nothing

    The role chunk waits for the first content block so that a failure right after
    ``message_start`` (an ``overloaded_error`` event, say) happens before any output and can
    still be retried elsewhere. ``error`` events are the caller's to raise.
    """

    def __init__(self, *, created: int, model: str) -> None:
        self._base: JsonObject = {
            "id": "",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._usage: dict[str, object] = {}
        self._stop_reason: object = None
        self._tool_index: dict[int, int] = {}
        self._role_sent = False
        self.finished = False
        """True once ``message_stop`` arrived: the answer is complete."""

    def feed(self, event: Mapping[str, object]) -> list[ChatChunk]:
        kind = event.get("type")
        if kind == "message_start":
            message = _obj(event.get("message"))
            self._base["id"] = message.get("id", "")
            self._base["model"] = message.get("model", self._base["model"])
            self._usage.update(_obj(message.get("usage")))
            return []
        if kind == "content_block_start":
            return self._block_start(_int(event.get("index")), _obj(event.get("content_block")))
        if kind == "content_block_delta":
            return self._block_delta(_int(event.get("index")), _obj(event.get("delta")))
        if kind == "message_delta":
            self._stop_reason = _obj(event.get("delta")).get("stop_reason")
            self._usage.update(_obj(event.get("usage")))
            return []
        if kind == "message_stop":
            self.finished = True
            usage = usage_of(self._usage)
            return [
                *self._role(),
                self._chunk({}, finish_reason=finish_reason(self._stop_reason)),
                ChatChunk({**self._base, "choices": [], "usage": usage.to_openai()}, usage=usage),
            ]
        return []

    def _block_start(self, index: int, block: Mapping[str, object]) -> list[ChatChunk]:
        if block.get("type") == "text":
            text = block.get("text")
            return [*self._role(), *([self._chunk({"content": text})] if text else [])]
        if block.get("type") == "tool_use":
            position = self._tool_index[index] = len(self._tool_index)
            call = {
                "index": position,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [*self._role(), self._chunk({"tool_calls": [call]})]
        return []

    def _block_delta(self, index: int, delta: Mapping[str, object]) -> list[ChatChunk]:
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        partial = delta.get("partial_json")
        if delta.get("type") == "input_json_delta" and partial and index in self._tool_index:
            call = {"index": self._tool_index[index], "function": {"arguments": partial}}
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _role(self) -> list[ChatChunk]:
        if self._role_sent:
            return []
        self._role_sent = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _chunk(self, delta: JsonObject, finish_reason: str | None = None) -> ChatChunk:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return ChatChunk({**self._base, "choices": [choice]})
