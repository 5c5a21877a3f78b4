"""Usage summaries: ``GET /admin/usage`` (everyone's) and ``GET /v1/usage`` (the caller's team).

Both read the store's per-day aggregates: ``?group_by=`` any of ``day,key,team,model``
(default ``day``), ``since``/``until`` (``YYYY-MM-DD``, UTC, inclusive) and the filters
``team_id``, ``key_id``, ``model``. Money is in dollars on the wire.

``/v1/usage`` is always narrowed to the caller's own team, or, for a key without a team, to
the key itself: a filter that points elsewhere is refused (403) rather than quietly emptied.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.admin import admin_only, json_response
from headrace.api.admin_wire import UsageQuery, parse, usage_view
from headrace.api.context import authenticated_call, runtime
from headrace.domain import Principal
from headrace.errors import PermissionDeniedError
from headrace.store.base import GroupBy, Store

router = APIRouter()


async def _summary(
    store: Store, query: UsageQuery, *, team_id: str | None, key_id: str | None
) -> Response:
    group_by: list[GroupBy] = list(dict.fromkeys(query.group_by)) or ["day"]
    rows = await store.usage_summary(
        group_by,
        since_day=query.since,
        until_day=query.until,
        team_id=team_id,
        key_id=key_id,
        model=query.model,
    )
    return json_response(usage_view(rows, group_by))


async def own_scope(
    store: Store,
    principal: Principal,
    team_id: str | None,
    key_id: str | None,
    what: str = "usage",
) -> tuple[str | None, str | None]:
    """``(team_id, key_id)`` filters that keep ``principal`` inside its own team (or, for a
    key without a team, itself), from the ones asked for; 403 for one that points elsewhere.
    ``what`` names what is read, in the messages."""
    if principal.team_id is None:
        if team_id is not None:
            raise PermissionDeniedError(
                f"This key belongs to no team, so it sees only its own {what}; drop team_id.",
                param="team_id",
            )
        if key_id not in (None, principal.key_id):
            raise PermissionDeniedError(
                f"This key belongs to no team, so it sees only its own {what}; drop key_id.",
                param="key_id",
            )
        return None, principal.key_id
    if team_id not in (None, principal.team_id):
        raise PermissionDeniedError(
            f"This key sees only its own team's {what} ({principal.team_id}); drop team_id or "
            "ask an administrator.",
            param="team_id",
        )
    if key_id is not None and key_id != principal.key_id:
        key = await store.get_key(key_id)
        if key is None or key.team_id != principal.team_id:
            raise PermissionDeniedError(
                f"key_id {key_id!r} is not a key of this key's team "
                f"({principal.team_id}); drop it or name one of your team's keys.",
                param="key_id",
            )
    return principal.team_id, key_id


@router.get("/admin/usage", tags=["admin"])
async def admin_usage(request: Request) -> Response:
    """Tokens, requests, cost and routing savings of every key and team."""
    _, rt = await admin_only(request)
    query = parse(UsageQuery, dict(request.query_params))
    return await _summary(rt.store, query, team_id=query.team_id, key_id=query.key_id)


@router.get("/v1/usage", tags=["usage"])
async def own_usage(request: Request) -> Response:
    """The same summary for any key, limited to its own team (or, without one, to itself)."""
    call = await authenticated_call(request)
    assert call.principal is not None
    store = runtime(request).store
    query = parse(UsageQuery, dict(request.query_params))
    team_id, key_id = await own_scope(store, call.principal, query.team_id, query.key_id)
    return await _summary(store, query, team_id=team_id, key_id=key_id)
