"""Telling callers what happened to their work: signed webhooks (and, later, SSE fan-out).

Modules, each usable on its own:

- :mod:`headrace.events.signing` — the Standard Webhooks signature scheme (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``), ``whsec_`` secrets,
  and a verifier for receivers and tests.
- :mod:`headrace.events.ssrf` — which webhook URLs may be called: a static check for submit
  time, a DNS-resolving check, and an aiohttp resolver that re-checks every address at connect
  time so DNS rebinding cannot reach an internal service.
- :mod:`headrace.events.webhooks` — one stateless delivery attempt (sign, POST, classify the
  answer) and the backoff between attempts. The durable outbox and its retry loop sit on top.

Errors::

    ValueError
    └── WebhookVerificationError     signing: a delivery failed verification (receiver side)
    HeadraceError (headrace.errors)
    └── ValidationFailedError        400 invalid_value
        └── UnsafeWebhookUrlError    ssrf: a URL or resolved address Headrace will not call
"""
