"""Cache keys: a hash of what determines the answer, and nothing else.

The key covers the normalised request body — model, messages, tools, sampling parameters,
response format and any field Headrace does not know (an unknown field may change the
answer, so it counts) — minus fields that cannot change the answer (:data:`IGNORED`), with
OpenAI's defaults removed so that ``{"temperature": 1}`` and no temperature hash alike, and
``max_tokens`` / ``max_completion_tokens`` unified. The namespace (a team, a key, or
``shared``) is part of the key, so tenants never share entries unless configured to.
Streamed and non-streamed answers are kept apart (``kind``): a transcript of chunks and a
completion object are different values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

IGNORED = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)

_MISSING = object()

# OpenAI's documented defaults: sending them changes nothing.
_DEFAULTS: Mapping[str, Any] = {
    "temperature": 1,
    "top_p": 1,
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": True,
    "tool_choice": "auto",
}


def _normalised(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name in IGNORED or value is None:
            continue
        default = _DEFAULTS.get(name, _MISSING)
        # Compare with type: True == 1 in Python, but n=True is not n=1 on the wire.
        if type(value) is type(default) and value == default:
            continue
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (isinstance(default, int | float) and not isinstance(default, bool))
            and value == default
        ):
            continue  # 1 and 1.0 are the same temperature
        out[name] = value
    if "max_completion_tokens" in out:
        out["max_tokens"] = out.pop("max_completion_tokens")
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if out.get("tool_choice") == "auto" and "tools" not in out:
        out.pop("tool_choice")
    return out


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Greedy decoding (temperature 0) or a fixed seed: the answer is meant to repeat."""
    temperature = body.get("temperature", _DEFAULTS["temperature"])
    return temperature == 0 or body.get("seed") is not None


def cache_key(namespace: str, kind: str, model: str, body: Mapping[str, Any]) -> str:
    """``<namespace>:<kind>:<sha256 of the normalised request>`` (hex)."""
    normal = _normalised(body)
    normal["model"] = model
    digest = hashlib.sha256(orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{namespace}:{kind}:{digest}"
