"""Every error Headrace raises on purpose, rendered by one handler in OpenAI's error shape.

::

    HeadraceError                      500 api_error
    ├── InvalidRequestError            400 invalid_request_error
    │   ├── MalformedJsonError         400 invalid_request_error / invalid_json
    │   ├── ValidationFailedError      400 invalid_request_error / invalid_value (names the field)
    │   ├── PayloadTooLargeError       413 invalid_request_error / payload_too_large
    │   └── (jobs.batches) BatchInputError 400 / invalid_batch_input (every bad line listed)
    ├── AuthenticationError            401 authentication_error / invalid_api_key
    ├── PermissionDeniedError          403 permission_error
    ├── NotFoundError                  404 not_found_error
    │   └── ModelNotFoundError         404 invalid_request_error / model_not_found
    ├── ConflictError                  409 invalid_request_error / conflict
    ├── RateLimitExceededError         429 requests|tokens / rate_limit_exceeded (+ Retry-After)
    ├── BudgetExceededError            402 insufficient_quota / budget_exceeded
    ├── OverloadedError                503 service_unavailable / overloaded
    │   └── StoreUnavailableError      503 service_unavailable / store_unavailable (+ Retry-After)
    ├── ClientClosedError              499 client_closed / client_closed_request (nobody reads it)
    └── UpstreamError                  502 upstream_error (names the deployment, never its key)
        ├── UpstreamStatusError        502 (the upstream answered 5xx, 401/403, or nonsense)
        ├── UpstreamRejectedError      400 (the upstream refused the request itself: 400/404/422)
        ├── UpstreamRateLimitedError   429 (the upstream is rate limiting; Retry-After passed on)
        ├── UpstreamUnavailableError   503 (could not connect)
        └── UpstreamTimeoutError       504 (no answer in time)

Messages say what happened and what to do about it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HeadraceError(Exception):
    """Base of the tree. ``status`` is the HTTP status; ``type``/``code`` go on the wire."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(HeadraceError):
    status = 400
    type = "invalid_request_error"


class MalformedJsonError(InvalidRequestError):
    default_code = "invalid_json"


class ValidationFailedError(InvalidRequestError):
    default_code = "invalid_value"


class PayloadTooLargeError(InvalidRequestError):
    status = 413
    default_code = "payload_too_large"


class AuthenticationError(HeadraceError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(HeadraceError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(HeadraceError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    default_code = "model_not_found"


class ConflictError(HeadraceError):
    """The request contradicts what is stored (a duplicate id, a team that still owns keys)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class RateLimitExceededError(HeadraceError):
    """A key's or team's RPM, TPM or parallel-request limit. ``type`` says which, as OpenAI's."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_type: str = "requests", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.limit_type = limit_type

    def to_openai(self) -> dict[str, Any]:
        body = super().to_openai()
        body["error"]["type"] = self.limit_type
        return body


class BudgetExceededError(HeadraceError):
    """A hard budget would be exceeded. 402, not 429: retrying will not help until the period
    ends or the budget is raised, and clients (the openai SDK included) retry 429s."""

    status = 402
    type = "insufficient_quota"
    default_code = "budget_exceeded"


class OverloadedError(HeadraceError):
    status = 503
    type = "service_unavailable"
    default_code = "overloaded"


STORE_RETRY_AFTER_S = "5"  # Retry-After of a StoreUnavailableError: a restart takes seconds


class StoreUnavailableError(OverloadedError):
    """The database could not complete the operation (down, restarting, locked, timed out).

    Raised for the store's connection and operational errors (the API's handler, the key
    lookup), so that a client retries instead of seeing an internal error; nothing the
    request asked for was done.
    """

    default_code = "store_unavailable"


class ClientClosedError(HeadraceError):
    """The client went away before its request was complete: nginx's 499.

    Nobody is left to read the answer; the status is for the metrics, the access log and the
    usage record. Not an error of the gateway's, so it is never logged as one.
    """

    status = 499
    type = "client_closed"
    default_code = "client_closed_request"


class UpstreamError(HeadraceError):
    """An upstream deployment failed. ``deployment`` names it; messages never carry keys."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        deployment: str,
        upstream_status: int | None = None,
        retry_after_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.deployment = deployment
        self.upstream_status = upstream_status
        self.retry_after_s = retry_after_s


class UpstreamStatusError(UpstreamError):
    default_code = "upstream_status"


class UpstreamRejectedError(UpstreamError):
    status = 400
    type = "invalid_request_error"
    default_code = "upstream_rejected"


class UpstreamRateLimitedError(UpstreamError):
    status = 429
    type = "rate_limit_error"
    default_code = "upstream_rate_limited"


class UpstreamUnavailableError(UpstreamError):
    status = 503
    default_code = "upstream_unavailable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    default_code = "upstream_timeout"
