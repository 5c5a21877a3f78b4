"""Which failures are worth another try, and where.

======================  ===============================================  ========================
class                   what                                             handling
======================  ===============================================  ========================
``transient``           connection errors, timeouts, 408, 429, 500,      retry with backoff, on
                        502, 503, 504, 529, invalid upstream JSON        another deployment when
                                                                         one exists; then the
                                                                         model's fallbacks
``context_length``      the prompt does not fit the model's window       no retry; the model's
                                                                         context-window fallbacks
``permanent``           400, 401, 403, 404, 422, content policy          never retried; returned
                                                                         to the client as is
``partial``             a stream failed after output reached the         cannot be retried: the
                        client                                           stream ends with an
                                                                         error event
======================  ===============================================  ========================

An upstream 429 also cools its deployment down for ``Retry-After`` instead of counting as a
breaker failure; 401/403 count as breaker failures (the deployment's credentials are wrong for
everyone) but are not retried.
"""

from __future__ import annotations

from enum import StrEnum

from headrace.errors import (
    HeadraceError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamStatusError,
)

_CONTEXT_PHRASES = (
    "context_length_exceeded",
    "context length",
    "context window",
    "maximum context",
    "prompt is too long",
    "too many tokens",
)


class ErrorClass(StrEnum):
    TRANSIENT = "transient"
    CONTEXT_LENGTH = "context_length"
    PERMANENT = "permanent"
    PARTIAL = "partial"


def _is_context_length(error: HeadraceError) -> bool:
    if error.code == "context_length_exceeded":
        return True
    message = error.message.lower()
    return any(phrase in message for phrase in _CONTEXT_PHRASES)


def classify(error: HeadraceError) -> ErrorClass:
    """The class of a failure that happened before any output reached the client."""
    if _is_context_length(error):
        return ErrorClass.CONTEXT_LENGTH
    if isinstance(error, UpstreamRejectedError):
        return ErrorClass.PERMANENT
    if isinstance(error, UpstreamStatusError) and error.upstream_status in (401, 403):
        return ErrorClass.PERMANENT
    if isinstance(error, UpstreamError):
        return ErrorClass.TRANSIENT
    return ErrorClass.PERMANENT


def counts_against_breaker(error: HeadraceError) -> bool:
    """Whether the failure says something about the deployment's health.

    Client mistakes (permanent 4xx from the request itself, context length) do not; a 429 is
    handled by a cool-down instead.
    """
    if isinstance(error, UpstreamRateLimitedError):
        return False
    if isinstance(error, UpstreamStatusError) and error.upstream_status in (401, 403):
        return True
    return classify(error) is ErrorClass.TRANSIENT
