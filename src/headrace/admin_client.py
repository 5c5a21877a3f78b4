"""A small client for a running gateway's ``/admin`` API, used by the CLI.

Blocking (``urllib``) on purpose: the CLI makes one call and exits.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson


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
) -> Any:
    """``method path?query`` with ``body`` (when not None) as JSON; the decoded JSON answer."""
    url = base_url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    if not url.startswith(("http://", "https://")):
        raise AdminError(f"--url must be an http(s) URL, not {base_url!r}.")
    headers = {"Authorization": f"Bearer {admin_key}"}
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return orjson.loads(response.read())
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
