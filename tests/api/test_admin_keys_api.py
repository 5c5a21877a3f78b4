"""Teams, virtual keys and usage through the admin API and ``/v1/usage``, in process."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest

from headrace.domain import BudgetPeriod, Role
from headrace.gateway.auth import hash_secret, new_key, new_secret
from tests.conftest import AUTH, GatewayFactory

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def create_key(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/admin/keys", json=fields, headers=AUTH)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def create_team(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/admin/teams", json=fields, headers=AUTH)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def chat(client: httpx.AsyncClient, secret: str, model: str = "echo") -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", json={**CHAT, "model": model}, headers=bearer(secret)
    )


async def test_team_crud(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    team = await create_team(
        client, id="research", name="Research", budget_usd=12.5, budget_period="week", rpm=60
    )
    assert team["object"] == "team"
    assert (team["id"], team["name"], team["budget_usd"], team["budget_period"]) == (
        "research",
        "Research",
        12.5,
        "week",
    )
    generated = await create_team(client, name="No id given")
    assert re.fullmatch(r"team_[0-9a-f]{16}", generated["id"])
    duplicate = await client.post("/admin/teams", json={"id": "research"}, headers=AUTH)
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["param"] == "id"

    listed = (await client.get("/admin/teams", headers=AUTH)).json()
    assert [t["id"] for t in listed["data"]] == ["research", generated["id"]]
    patched = await client.patch(
        "/admin/teams/research", json={"rpm": None, "tpm": 1000, "name": "R&D"}, headers=AUTH
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["rpm"], patched.json()["tpm"], patched.json()["name"]) == (
        None,
        1000,
        "R&D",
    )
    shown = (await client.get("/admin/teams/research", headers=AUTH)).json()
    assert shown == patched.json()
    assert shown["budget_usd"] == 12.5  # untouched by the patch
    assert (await client.get("/admin/teams/nope", headers=AUTH)).status_code == 404

    key = await create_key(client, name="k", team_id="research")
    busy = await client.delete("/admin/teams/research", headers=AUTH)
    assert busy.status_code == 409
    assert "1 key(s)" in busy.json()["error"]["message"]
    moved = await client.patch(f"/admin/keys/{key['id']}", json={"team_id": None}, headers=AUTH)
    assert moved.json()["team_id"] is None
    deleted = await client.delete("/admin/teams/research", headers=AUTH)
    assert deleted.json() == {"object": "team.deleted", "id": "research", "deleted": True}
    assert (await client.delete("/admin/teams/research", headers=AUTH)).status_code == 404


async def test_a_key_secret_is_shown_once_and_never_again(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    await create_team(client, id="t1")
    created = await create_key(
        client,
        name="ci",
        team_id="t1",
        user="ada@example.com",
        allowed_models=["echo"],
        rpm=100,
        tpm=10_000,
        max_parallel=4,
        budget_usd="0.000001",
        budget_period="day",
        soft_budget_ratio=0.8,
        expires_in_s=3600,
        metadata={"tier": "gold"},
    )
    secret = created.pop("key")
    assert secret.startswith("hr_")
    assert created["prefix"] == secret[:8]
    assert (created["rpm"], created["tpm"], created["max_parallel"]) == (100, 10_000, 4)
    assert (created["budget_usd"], created["budget_period"]) == (0.000001, "day")
    assert created["soft_budget_ratio"] == 0.8
    assert created["role"] == "user"
    assert created["metadata"] == {"tier": "gold"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created["expires_at"])
    stored = await rt.store.get_key(created["id"])
    assert stored is not None
    assert stored.quota.budget_micro_usd == 1  # dollars on the wire, micro-dollars inside
    assert stored.quota.budget_period is BudgetPeriod.DAY
    assert stored.expires_at is not None
    assert abs(stored.expires_at - (time.time() + 3600)) < 60

    shown = await client.get(f"/admin/keys/{created['id']}", headers=AUTH)
    listed = await client.get("/admin/keys", params={"team_id": "t1"}, headers=AUTH)
    assert shown.json() == created
    assert listed.json()["data"] == [created]
    for response in (shown, listed):
        assert secret not in response.text
        assert hash_secret(secret) not in response.text
        assert "secret" not in response.text
    assert (await chat(client, secret)).status_code == 200


async def test_patch_changes_fields_but_never_the_secret(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    created = await create_key(client, name="before", rpm=5)
    secret = created["key"]
    patched = await client.patch(
        f"/admin/keys/{created['id']}",
        json={"name": "after", "rpm": None, "budget_usd": 3, "metadata": {"a": "b"}},
        headers=AUTH,
    )
    assert patched.status_code == 200, patched.text
    view = patched.json()
    assert "key" not in view
    assert (view["name"], view["rpm"], view["budget_usd"], view["metadata"]) == (
        "after",
        None,
        3.0,
        {"a": "b"},
    )
    assert view["prefix"] == created["prefix"]
    assert (await chat(client, secret)).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rpm": 0}, "rpm"),
        ({"tpm": "lots"}, "tpm"),
        ({"tpm": 2**31}, "tpm"),  # the store's columns are 32-bit: a 400, not a 500
        ({"max_parallel": 10**12}, "max_parallel"),
        ({"max_parallel": 1.5}, "max_parallel"),
        ({"budget_usd": 1.1234567}, "budget_usd"),
        ({"budget_usd": -1}, "budget_usd"),
        ({"budget_period": "year"}, "budget_period"),
        ({"budget_usd": 1, "soft_budget_ratio": 1.5}, "soft_budget_ratio"),
        ({"soft_budget_ratio": 0.5}, "soft_budget_ratio"),  # without a hard budget
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),  # in the past
        ({"expires_at": 4102444800, "expires_in_s": 60}, "expires_in_s"),
        ({"expires_in_s": 0}, "expires_in_s"),
        ({"metadata": {"tier": 1}}, "metadata.tier"),
        ({"allowed_models": ["echo", ""]}, "allowed_models[1]"),
        ({"allowed_models": "echo"}, "allowed_models"),
        ({"role": "root"}, "role"),
        ({"secret": "hr_mine"}, "secret"),
    ],
)
async def test_bad_key_fields_are_400s_naming_the_field(
    gateway: GatewayFactory, body: dict[str, Any], param: str
) -> None:
    client, _ = await gateway()
    response = await client.post("/admin/keys", json={"name": "x", **body}, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert f"'{param}'" in error["message"]


async def test_bad_team_fields_and_bodies(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    for team_id in ("Has Caps", "-dash-first", "x" * 64):
        response = await client.post("/admin/teams", json={"id": team_id}, headers=AUTH)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "id"
    not_json = await client.post("/admin/teams", content=b"{", headers=AUTH)
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "invalid_json")
    a_list = await client.post("/admin/teams", json=[], headers=AUTH)
    assert a_list.status_code == 400
    too_large = await client.post("/admin/teams", json={"tpm": 2**31}, headers=AUTH)
    assert (too_large.status_code, too_large.json()["error"]["param"]) == (400, "tpm")
    await create_team(client, id="ok")
    bad_patch = await client.patch("/admin/teams/ok", json={"id": "renamed"}, headers=AUTH)
    assert (bad_patch.status_code, bad_patch.json()["error"]["param"]) == (400, "id")


async def test_a_key_must_name_an_existing_team(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    response = await client.post("/admin/keys", json={"team_id": "ghost"}, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "team_id"
    assert "ghost" in error["message"]
    key = await create_key(client)
    moved = await client.patch(f"/admin/keys/{key['id']}", json={"team_id": "ghost"}, headers=AUTH)
    assert (moved.status_code, moved.json()["error"]["param"]) == (400, "team_id")
    listing = await client.get("/admin/keys", params={"team_id": "ghost"}, headers=AUTH)
    assert listing.status_code == 404
    assert (await client.get("/admin/keys/key_nope", headers=AUTH)).status_code == 404


async def test_revoking_a_key_refuses_it_at_once(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    first, second = await create_key(client, name="a"), await create_key(client, name="b")
    # Both keys are now in the authenticator's cache: revoking must still bite at once.
    assert (await chat(client, first["key"])).status_code == 200
    assert (await chat(client, second["key"])).status_code == 200
    revoked = await client.post(f"/admin/keys/{first['id']}/revoke", headers=AUTH)
    assert (revoked.status_code, revoked.json()["revoked"]) == (200, True)
    refused = await chat(client, first["key"])
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    alias = await client.delete(f"/admin/keys/{second['id']}", headers=AUTH)
    assert alias.json()["revoked"] is True
    assert (await chat(client, second["key"])).status_code == 401
    again = await client.post(f"/admin/keys/{first['id']}/revoke", headers=AUTH)
    assert again.status_code == 200
    assert (await client.post("/admin/keys/key_nope/revoke", headers=AUTH)).status_code == 404


async def test_an_expired_key_gets_401_expired_api_key(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    key = await create_key(client, expires_in_s=3600)
    assert (await chat(client, key["key"])).status_code == 200
    # PATCH accepts a past expiry: it expires the key now.
    expired = await client.patch(
        f"/admin/keys/{key['id']}", json={"expires_at": int(time.time()) - 1}, headers=AUTH
    )
    assert expired.status_code == 200, expired.text
    refused = await chat(client, key["key"])
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "expired_api_key"
    revived = await client.patch(
        f"/admin/keys/{key['id']}", json={"expires_at": None}, headers=AUTH
    )
    assert revived.json()["expires_at"] is None
    assert (await chat(client, key["key"])).status_code == 200


async def test_allowed_model_patterns(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    key = await create_key(client, allowed_models=["echo-*"])
    denied = await chat(client, key["key"], model="echo")
    assert (denied.status_code, denied.json()["error"]["type"]) == (403, "permission_error")
    allowed = await client.post(
        "/v1/embeddings",
        json={"model": "echo-embed", "input": "hi"},
        headers=bearer(key["key"]),
    )
    assert allowed.status_code == 200, allowed.text
    everything = await create_key(client, allowed_models=["echo*"])
    assert (await chat(client, everything["key"], model="echo")).status_code == 200


async def test_limits_set_through_the_api_apply(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    key = await create_key(client, rpm=1)
    assert (await chat(client, key["key"])).status_code == 200
    assert (await chat(client, key["key"])).status_code == 429


async def test_admin_routes_need_an_admin_key(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    user = await create_key(client, name="plain user")
    for method, path in [
        ("GET", "/admin/teams"),
        ("POST", "/admin/teams"),
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("PATCH", f"/admin/keys/{user['id']}"),
        ("POST", f"/admin/keys/{user['id']}/revoke"),
        ("GET", "/admin/usage"),
    ]:
        response = await client.request(method, path, json={}, headers=bearer(user["key"]))
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["type"] == "permission_error"
    assert (await client.get("/admin/keys")).status_code == 401
    # An admin key issued through the API is an admin key.
    admin = await create_key(client, role="admin")
    assert (await client.get("/admin/keys", headers=bearer(admin["key"]))).status_code == 200
    stored = await rt.store.get_key(admin["id"])
    assert stored is not None
    assert stored.role is Role.ADMIN


async def usage_rows(
    client: httpx.AsyncClient,
    path: str,
    headers: dict[str, str],
    params: dict[str, str],
    expect_requests: int,
    timeout_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Poll a usage route until its rows add up to ``expect_requests`` (records are written
    by the usage writer every flush interval, off the request path)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        if sum(r["requests"] for r in rows) >= expect_requests or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_v1_usage_shows_only_the_callers_team(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    await create_team(client, id="alpha")
    await create_team(client, id="beta")
    a1 = await create_key(client, team_id="alpha")
    a2 = await create_key(client, team_id="alpha")
    b1 = await create_key(client, team_id="beta")
    loner = await create_key(client)
    for key, times in ((a1, 2), (a2, 1), (b1, 3), (loner, 1)):
        for _ in range(times):
            assert (await chat(client, key["key"])).status_code == 200

    everyone = await usage_rows(client, "/admin/usage", AUTH, {"group_by": "team,key"}, 7)
    assert {(r["team_id"], r["requests"]) for r in everyone} == {
        ("alpha", 2),
        ("alpha", 1),
        ("beta", 3),
        (None, 1),
    }
    row = everyone[0]
    assert set(row) >= {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
        "baseline_cost_usd",
        "routing_saved_usd",
        "cache_hits",
        "errors",
    }
    assert "day" not in row  # only the fields grouped by

    mine = await usage_rows(client, "/v1/usage", bearer(a1["key"]), {"group_by": "key"}, 3)
    assert {(r["key_id"], r["requests"]) for r in mine} == {(a1["id"], 2), (a2["id"], 1)}
    by_day = (await client.get("/v1/usage", headers=bearer(b1["key"]))).json()
    assert by_day["group_by"] == ["day"]
    assert [r["requests"] for r in by_day["data"]] == [3]
    own = (await client.get("/v1/usage", headers=bearer(loner["key"]))).json()["data"]
    assert [r["requests"] for r in own] == [1]
    narrowed = await client.get("/v1/usage", params={"key_id": a2["id"]}, headers=bearer(a1["key"]))
    assert [r["requests"] for r in narrowed.json()["data"]] == [1]

    for headers, params in [
        (bearer(a1["key"]), {"team_id": "beta"}),
        (bearer(a1["key"]), {"key_id": b1["id"]}),
        (bearer(a1["key"]), {"key_id": "key_unknown"}),
        (bearer(loner["key"]), {"team_id": "alpha"}),
        (bearer(loner["key"]), {"key_id": a1["id"]}),
    ]:
        refused = await client.get("/v1/usage", params=params, headers=headers)
        assert refused.status_code == 403, params
        assert refused.json()["error"]["param"] in params
    assert rt.usage is not None


async def test_usage_query_validation_and_filters(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    secret = new_secret()
    await rt.store.put(new_key(secret, role=Role.USER, name="direct"))
    assert (await chat(client, secret)).status_code == 200
    rows = await usage_rows(client, "/admin/usage", AUTH, {"group_by": "model,day"}, 1)
    (row,) = [r for r in rows if r["model"] == "echo"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert row["day"] == today
    assert row["routing_saved_usd"] == row["baseline_cost_usd"] - row["cost_usd"]
    after = await client.get("/admin/usage", params={"since": "2999-01-01"}, headers=AUTH)
    assert after.json()["data"] == []
    for params, param in [
        ({"group_by": "week"}, "group_by[0]"),
        ({"since": "2026-13-01"}, "since"),
        ({"until": "yesterday"}, "until"),
        ({"colour": "blue"}, "colour"),
    ]:
        response = await client.get("/admin/usage", params=params, headers=AUTH)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] == param
