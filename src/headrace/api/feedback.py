"""``/v1/feedback``: what a caller thought of an answer, kept beside the answer's usage.

``POST /v1/feedback`` takes the answer's request id (its ``X-Request-Id``) and at least one of
a ``score`` (a number: a thumbs up as 1, a rating, an evaluator's metric), a ``label`` and a
``comment``, plus string ``metadata``. The request must be one of the
caller's team's (a key without a team, the admin key included: its own), found in the usage
records. ``GET /v1/feedback`` lists feedback newest first, narrowed as ``/v1/usage`` is: a
key sees its team's (or, without a team, its own; a ``team_id`` or ``key_id`` elsewhere is a
403); ``?request_id=``, ``?key_id=`` and ``?limit=`` (1-1000, default 100) filter.
``GET /admin/feedback`` (the admin key) lists every team's, with ``?team_id=`` too.

Usage records reach the database within ``usage.flush_interval_s`` of the answer. A request
this process answered is flushed before the lookup; one another process answered a moment ago
may not be there yet, and its feedback gets a 404 that says to try again shortly.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.admin import admin_only, json_response
from headrace.api.admin_wire import parse
from headrace.api.context import authenticated_call, json_body, runtime
from headrace.api.usage import own_scope
from headrace.api.wire import invalid
from headrace.domain import Feedback, Principal
from headrace.errors import InvalidRequestError, NotFoundError
from headrace.ids import unique_id
from headrace.store.base import Store
from headrace.wiring import Runtime

router = APIRouter()


class FeedbackBody(BaseModel):
    """The body of ``POST /v1/feedback``."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    score: float | None = None
    label: str | None = Field(None, min_length=1, max_length=64)
    comment: str | None = Field(None, min_length=1, max_length=4096)
    metadata: dict[
        Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=512)]
    ] = Field(default_factory=dict, max_length=16)


class FeedbackQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team_id: str | None = Field(None, min_length=1, max_length=64)
    request_id: str | None = Field(None, min_length=1, max_length=200)
    key_id: str | None = Field(None, min_length=1, max_length=64)
    limit: int = Field(100, ge=1, le=1000)


def view(feedback: Feedback) -> dict[str, Any]:
    return {
        "id": feedback.id,
        "object": "feedback",
        "request_id": feedback.request_id,
        "key_id": feedback.key_id,
        "team_id": feedback.team_id,
        "created_at": int(feedback.created_at),
        "score": feedback.score,
        "label": feedback.label,
        "comment": feedback.comment,
        "metadata": dict(feedback.metadata),
    }


async def _recorded(rt: Runtime, request_id: str, principal: Principal) -> bool:
    """Whether ``request_id`` is one of the caller's team's (or, without a team, its own)."""
    team_id, key_id = await own_scope(rt.store, principal, None, None, "requests")
    if await rt.store.request_recorded(request_id, team_id=team_id, key_id=key_id):
        return True
    usage = rt.usage
    if usage is None or usage.pending == 0:
        return False
    await usage.flush()  # answered by this process a moment ago: its record was buffered
    return await rt.store.request_recorded(request_id, team_id=team_id, key_id=key_id)


@router.post("/v1/feedback", tags=["feedback"], status_code=201)
async def give_feedback(request: Request) -> Response:
    """Feedback on one answer of the caller's team: a score, a label, a comment."""
    call = await authenticated_call(request)
    principal = call.principal
    assert principal is not None
    try:
        body = FeedbackBody.model_validate(await json_body(request))
    except ValidationError as exc:
        raise invalid(exc) from None
    if body.score is None and body.label is None and body.comment is None:
        raise InvalidRequestError(
            "Give at least one of score, label and comment.", code="missing_required_parameter"
        )
    rt = runtime(request)
    if rt.usage is None:
        raise NotFoundError(
            "Feedback needs usage records, and this gateway keeps none (usage.enabled is false).",
            code="feedback_unavailable",
        )
    if not await _recorded(rt, body.request_id, principal):
        flush_s = rt.usage.flush_interval_s
        raise NotFoundError(
            f"No request {body.request_id!r} of this key's team (or, for a key without a "
            "team, of this key) is recorded. Usage records reach "
            f"the database within {flush_s:g} s of the answer: if it was just answered by "
            "another gateway process, try again shortly.",
            param="request_id",
            code="request_not_found",
        )
    feedback = Feedback(
        id=f"fb_{unique_id()}",
        request_id=body.request_id,
        key_id=principal.key_id,
        team_id=principal.team_id,
        created_at=time.time(),
        score=body.score,
        label=body.label,
        comment=body.comment,
        metadata=body.metadata,
    )
    await rt.store.add_feedback(feedback)
    return Response(orjson.dumps(view(feedback)), status_code=201, media_type="application/json")


@router.get("/v1/feedback", tags=["feedback"])
async def list_feedback(request: Request) -> Response:
    """Feedback newest first: the caller's team's (or, for a key without a team, its own)."""
    call = await authenticated_call(request)
    principal = call.principal
    assert principal is not None
    query = parse(FeedbackQuery, dict(request.query_params))
    store = runtime(request).store
    team_id, key_id = await own_scope(store, principal, query.team_id, query.key_id, "feedback")
    return await _listing(store, query, team_id, key_id)


@router.get("/admin/feedback", tags=["admin"])
async def every_teams_feedback(request: Request) -> Response:
    """Every team's feedback, newest first (``team_id``, ``key_id``, ``request_id``, ``limit``)."""
    _, rt = await admin_only(request)
    query = parse(FeedbackQuery, dict(request.query_params))
    return await _listing(rt.store, query, query.team_id, query.key_id)


async def _listing(
    store: Store, query: FeedbackQuery, team_id: str | None, key_id: str | None
) -> Response:
    """The feedback ``query`` asks for, within ``team_id`` and ``key_id``, as the API's list."""
    found = await store.list_feedback(
        team_id=team_id, key_id=key_id, request_id=query.request_id, limit=query.limit
    )
    return json_response({"object": "list", "data": [view(f) for f in found]})
