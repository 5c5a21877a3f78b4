"""A small client for a running gateway's API, used by the CLI: the ``/admin`` routes with an
admin key, and the file and batch routes of ``headrace batch`` with a user key.

Blocking (``urllib``) on purpose: the CLI makes a few calls and exits.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

DEFAULT_TIMEOUT_S = 10.0


class AdminError(Exception):
    """The gateway refused or could not be reached; the message says which and why."""


def call(
    base_url: str,
    admin_key: str,
    method: str,
    path: str,
    query: dict[str, str] | None = None,
    *,
    body: object = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """``method path?query`` with ``body`` (when not None) as JSON; the decoded JSON answer.

    ``admin_key`` is sent as the bearer token: any API key works for the routes it may use.
    """
    headers = {"Authorization": f"Bearer {admin_key}"}
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    request = _request(_url(base_url, path, query), method, headers, data)
    return orjson.loads(_send(base_url, path, request, timeout_s=timeout_s))


def upload(
    base_url: str,
    api_key: str,
    path: str,
    *,
    fields: Mapping[str, str],
    file_field: str,
    filename: str,
    content: bytes,
    timeout_s: float = 300.0,
) -> Any:
    """POST a ``multipart/form-data`` body (``fields`` and one file); the decoded JSON answer."""
    boundary = f"headrace-{uuid.uuid4().hex}"
    safe_name = "".join(ch for ch in filename if ch.isprintable() and ch not in '"\\')
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f"--{boundary}\r\nContent-Disposition: form-data; "
        f'name="{file_field}"; filename="{safe_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    request = _request(_url(base_url, path, None), "POST", headers, b"".join(parts))
    return orjson.loads(_send(base_url, path, request, timeout_s=timeout_s))


def fetch(base_url: str, api_key: str, path: str, *, timeout_s: float = 300.0) -> bytes:
    """GET ``path``; the answer's bytes as they are (a file's content)."""
    headers = {"Authorization": f"Bearer {api_key}"}
    request = _request(_url(base_url, path, None), "GET", headers)
    return _send(base_url, path, request, timeout_s=timeout_s)


def _url(base_url: str, path: str, query: dict[str, str] | None) -> str:
    url = base_url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    if not url.startswith(("http://", "https://")):
        raise AdminError(f"--url must be an http(s) URL, not {base_url!r}.")
    return url


def _send(
    base_url: str,
    path: str,
    request: urllib.request.Request,
    *,
    timeout_s: float,
) -> bytes:
    method = request.get_method()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = orjson.loads(exc.read())["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = exc.reason
        raise AdminError(f"{method} {path} failed with HTTP {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise AdminError(
            f"Cannot reach Headrace at {base_url}: {exc.reason}. Is `headrace serve` running? "
            "Pass --url."
        ) from None


def _request(
    url: str, method: str, headers: dict[str, str], data: bytes | None = None
) -> urllib.request.Request:
    return urllib.request.Request(  # noqa: S310 - scheme checked in _url
        url, data=data, method=method, headers=headers
    )
