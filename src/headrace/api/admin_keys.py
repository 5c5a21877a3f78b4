"""``/admin/teams`` and ``/admin/keys``: tenants and their virtual keys. Admin keys only.

A key's secret is in the response to ``POST /admin/keys`` and nowhere else, ever: the store
keeps only its SHA-256. Every change calls :meth:`Authenticator.forget`, so this process
applies it to the next request; other processes apply it within ``auth.key_cache_ttl_s``.
Bodies and views are in :mod:`headrace.api.admin_wire`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.admin import admin_only, json_response
from headrace.api.admin_wire import (
    KeyCreate,
    KeyPatch,
    TeamCreate,
    TeamPatch,
    key_fields,
    key_view,
    new_team,
    parse,
    patched_key,
    patched_team,
    team_view,
)
from headrace.api.context import json_body
from headrace.domain import ApiKey, Team
from headrace.errors import ConflictError, NotFoundError, ValidationFailedError
from headrace.gateway.auth import new_key, new_secret
from headrace.store.base import Store

router = APIRouter()


def _created(body: dict[str, Any]) -> Response:
    response = json_response(body)
    response.status_code = 201
    return response


async def _team(store: Store, team_id: str) -> Team:
    team = await store.get_team(team_id)
    if team is None:
        raise NotFoundError(f"No team {team_id!r}; GET /admin/teams lists them.")
    return team


async def _key(store: Store, key_id: str) -> ApiKey:
    key = await store.get_key(key_id)
    if key is None:
        raise NotFoundError(f"No API key {key_id!r}; GET /admin/keys lists them.")
    return key


async def _check_team_exists(store: Store, team_id: str | None) -> None:
    if team_id is not None and await store.get_team(team_id) is None:
        raise ValidationFailedError(
            f"Invalid value for 'team_id': no team {team_id!r}. Create it first "
            "(POST /admin/teams) or leave team_id out.",
            param="team_id",
        )


# -- teams ----------------------------------------------------------------------------------


@router.post("/admin/teams", tags=["admin"], status_code=201)
async def create_team(request: Request) -> Response:
    """Create a team; ``id`` is optional (default ``team_<hex>``)."""
    _, rt = await admin_only(request)
    team = new_team(parse(TeamCreate, await json_body(request)), time.time())
    if await rt.store.get_team(team.id) is not None:
        raise ConflictError(
            f"Team {team.id!r} already exists; PATCH /admin/teams/{team.id} changes it.",
            param="id",
        )
    await rt.store.put_team(team)
    return _created(team_view(team))


@router.get("/admin/teams", tags=["admin"])
async def list_teams(request: Request) -> Response:
    _, rt = await admin_only(request)
    teams = await rt.store.list_teams()
    return json_response({"object": "list", "data": [team_view(t) for t in teams]})


@router.get("/admin/teams/{team_id}", tags=["admin"])
async def get_team(team_id: str, request: Request) -> Response:
    _, rt = await admin_only(request)
    return json_response(team_view(await _team(rt.store, team_id)))


@router.patch("/admin/teams/{team_id}", tags=["admin"])
async def update_team(team_id: str, request: Request) -> Response:
    """Change a team's name, organization, limits, budget or metadata (``null`` clears)."""
    _, rt = await admin_only(request)
    body = parse(TeamPatch, await json_body(request))
    team = patched_team(await _team(rt.store, team_id), body)
    await rt.store.put_team(team)
    rt.authenticator.forget()  # cached principals carry their team's quota
    return json_response(team_view(team))


@router.delete("/admin/teams/{team_id}", tags=["admin"])
async def delete_team(team_id: str, request: Request) -> Response:
    """Delete a team that owns no keys (revoked ones included); 409 while it does."""
    _, rt = await admin_only(request)
    try:
        deleted = await rt.store.delete_team(team_id)
    except ValueError:
        owned = len(await rt.store.list_keys(team_id))
        raise ConflictError(
            f"Team {team_id!r} still owns {owned} key(s), revoked ones included. Move each "
            "to another team or to none (PATCH /admin/keys/{id} with team_id) first.",
            param="team_id",
        ) from None
    if not deleted:
        raise NotFoundError(f"No team {team_id!r}; GET /admin/teams lists them.")
    rt.authenticator.forget()
    return json_response({"object": "team.deleted", "id": team_id, "deleted": True})


# -- keys -----------------------------------------------------------------------------------


@router.post("/admin/keys", tags=["admin"], status_code=201)
async def create_key(request: Request) -> Response:
    """Issue a key. The response's ``key`` is the secret: shown this once, never again."""
    _, rt = await admin_only(request)
    body = parse(KeyCreate, await json_body(request))
    fields = key_fields(body, time.time())
    await _check_team_exists(rt.store, body.team_id)
    secret = new_secret()
    key = new_key(secret, **fields)
    await rt.store.put(key)
    return _created({"key": secret, **key_view(key)})


@router.get("/admin/keys", tags=["admin"])
async def list_keys(request: Request) -> Response:
    """Every key, oldest first; ``?team_id=`` narrows to one team's."""
    _, rt = await admin_only(request)
    team_id = request.query_params.get("team_id")
    if team_id is not None:
        await _team(rt.store, team_id)
    keys = await rt.store.list_keys(team_id)
    return json_response({"object": "list", "data": [key_view(k) for k in keys]})


@router.get("/admin/keys/{key_id}", tags=["admin"])
async def get_key(key_id: str, request: Request) -> Response:
    _, rt = await admin_only(request)
    return json_response(key_view(await _key(rt.store, key_id)))


@router.patch("/admin/keys/{key_id}", tags=["admin"])
async def update_key(key_id: str, request: Request) -> Response:
    """Change any of a key's fields but its secret; ``null`` clears a limit or the expiry."""
    _, rt = await admin_only(request)
    body = parse(KeyPatch, await json_body(request))
    key = patched_key(await _key(rt.store, key_id), body, time.time())
    if "team_id" in body.model_fields_set:
        await _check_team_exists(rt.store, key.team_id)
    await rt.store.put(key)
    rt.authenticator.forget()
    return json_response(key_view(key))


@router.post("/admin/keys/{key_id}/revoke", tags=["admin"])
@router.delete("/admin/keys/{key_id}", tags=["admin"])
async def revoke_key(key_id: str, request: Request) -> Response:
    """Revoke a key for good (again is harmless). The key is kept, so its usage still adds up."""
    _, rt = await admin_only(request)
    if not await rt.store.revoke(key_id):
        raise NotFoundError(f"No API key {key_id!r}; GET /admin/keys lists them.")
    rt.authenticator.forget()
    return json_response(key_view(await _key(rt.store, key_id)))
