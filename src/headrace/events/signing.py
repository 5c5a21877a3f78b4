"""The Standard Webhooks signature scheme (symmetric, ``v1``), for sending and for checking.

A delivery carries three headers::

    webhook-id:        the event id; the same on every retry, so receivers can deduplicate
    webhook-timestamp: when this attempt was signed, integer Unix seconds
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")> [v1,<...> ...]

The key is the base64 text of a ``whsec_<base64>`` secret, decoded. The signature header is a
space-separated list so that a secret can be rotated without downtime: while both are live the
sender signs with the old and the new secret, and a receiver holding either accepts. Entries
of other schemes (``v1a,`` is the asymmetric one) are skipped, not rejected.

The body is signed as the exact bytes sent; a receiver must verify the raw body before parsing
it, because re-serialised JSON rarely matches byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "new_secret",
    "sign",
    "verify",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's visible prefix, not a secret
DEFAULT_TOLERANCE_S = 300
"""How far a ``webhook-timestamp`` may be from the verifier's clock, either way (5 minutes,
as the spec's reference libraries use)."""

_MIN_KEY_BYTES = 24  # the spec's floor (192 bits)
_MAX_KEY_BYTES = 64  # and its ceiling (512 bits)
_HEADER_ID = "webhook-id"
_HEADER_TIMESTAMP = "webhook-timestamp"
_HEADER_SIGNATURE = "webhook-signature"


class WebhookVerificationError(ValueError):
    """A delivery did not verify: a header is missing or malformed, the timestamp is outside
    the tolerance, or no ``v1`` signature matches. The message says which."""


def new_secret(nbytes: int = 32) -> str:
    """A fresh random signing secret, ``whsec_`` + base64 of ``nbytes`` random bytes (24 to 64,
    the spec's range). Give each webhook endpoint its own."""
    if not _MIN_KEY_BYTES <= nbytes <= _MAX_KEY_BYTES:
        raise ValueError(
            f"A webhook secret is {_MIN_KEY_BYTES} to {_MAX_KEY_BYTES} random bytes; "
            f"got nbytes={nbytes}."
        )
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode("ascii")


def sign(secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers for sending ``body`` as message ``msg_id`` at ``timestamp``.

    ``secret`` is one ``whsec_`` secret, or several during a rotation (one signature each, in
    the order given). ``timestamp`` is integer Unix seconds: the time of this attempt, not of
    the event, so each retry is signed afresh. ``msg_id`` must not contain ``.`` (the spec
    forbids it: the signed content is dot-delimited).
    """
    if not msg_id or "." in msg_id:
        raise ValueError(
            f"A webhook id must be non-empty and contain no '.'; got {msg_id!r}. "
            "Use an opaque id such as 'evt_<uuid hex>'."
        )
    if timestamp < 0:
        raise ValueError(f"The webhook timestamp is Unix seconds, not negative; got {timestamp}.")
    keys = [_key(s) for s in _as_list(secret)]
    content = _signed_content(msg_id, str(timestamp), body)
    signatures = " ".join("v1," + _signature(key, content) for key in keys)
    return {
        _HEADER_ID: msg_id,
        _HEADER_TIMESTAMP: str(timestamp),
        _HEADER_SIGNATURE: signatures,
    }


def verify(
    secret: str | Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received delivery; return if it is authentic, raise
    :class:`WebhookVerificationError` if not.

    ``headers`` are matched case-insensitively (a plain dict or aiohttp's multidict both do).
    ``secret`` is the endpoint's ``whsec_`` secret, or several to accept any of them. The
    timestamp must be within ``tolerance_s`` seconds of ``now`` (Unix seconds, default the
    current time) in either direction, which bounds replays; deduplicate on ``webhook-id``.
    """
    keys = [_key(s) for s in _as_list(secret)]
    lower = {name.lower(): value for name, value in headers.items()}
    missing = [h for h in (_HEADER_ID, _HEADER_TIMESTAMP, _HEADER_SIGNATURE) if not lower.get(h)]
    if missing:
        raise WebhookVerificationError(
            f"Missing webhook header(s): {', '.join(missing)}. A Standard Webhooks delivery "
            "carries webhook-id, webhook-timestamp and webhook-signature."
        )
    msg_id = lower[_HEADER_ID]
    raw_timestamp = lower[_HEADER_TIMESTAMP].strip()
    if not raw_timestamp.isascii() or not raw_timestamp.isdigit():
        raise WebhookVerificationError(
            f"webhook-timestamp must be integer Unix seconds; got {raw_timestamp[:32]!r}."
        )
    skew_s = int(raw_timestamp) - (time.time() if now is None else now)
    if skew_s < -tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {-skew_s:.0f} s old, past the {tolerance_s:g} s tolerance: "
            "a replay, or a delivery held too long (check both clocks)."
        )
    if skew_s > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {skew_s:.0f} s in the future, past the {tolerance_s:g} s "
            "tolerance: check the sender's and the receiver's clocks."
        )

    offered = [
        value.encode("ascii", "replace")
        for version, _, value in (
            entry.partition(",") for entry in lower[_HEADER_SIGNATURE].split()
        )
        if version == "v1"
    ]
    if not offered:
        raise WebhookVerificationError(
            "webhook-signature holds no 'v1,<base64>' signature; it must carry at least one."
        )
    content = _signed_content(msg_id, raw_timestamp, body)
    expected = [_signature(key, content).encode("ascii") for key in keys]
    # Every pair is compared, in constant time each, so timing says nothing about which matched.
    matched = False
    for candidate in offered:
        for want in expected:
            matched |= hmac.compare_digest(candidate, want)
    if not matched:
        raise WebhookVerificationError(
            "No webhook signature matches: the body was altered, or it was signed with a "
            "different secret (verify the raw body, before parsing it, with this endpoint's "
            "secret)."
        )


def _as_list(secret: str | Sequence[str]) -> list[str]:
    found = [secret] if isinstance(secret, str) else list(secret)
    if not found:
        raise ValueError("At least one webhook secret is needed.")
    return found


def _key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret. Messages never echo the secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(
            f"A webhook secret starts with {SECRET_PREFIX!r} followed by base64; this one does "
            "not. Generate one with headrace.events.signing.new_secret()."
        )
    text = secret[len(SECRET_PREFIX) :]
    try:
        # Unpadded base64 is common in the wild; restore the padding before decoding.
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"The text after {SECRET_PREFIX!r} in the webhook secret is not valid base64. "
            "Generate one with headrace.events.signing.new_secret()."
        ) from None
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(
            f"The webhook secret decodes to {len(key)} bytes; Standard Webhooks needs at "
            f"least {_MIN_KEY_BYTES}. Generate one with headrace.events.signing.new_secret()."
        )
    return key


def _signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _signature(key: bytes, content: bytes) -> str:
    return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode("ascii")
