"""``/v1/feedback`` in process: feedback on one's own team's answers, listed within the team."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from headrace.config import UsageConfig
from tests.api.test_admin_keys_api import bearer, chat, create_key, create_team
from tests.conftest import AUTH, GatewayFactory


async def answered(client: httpx.AsyncClient, secret: str) -> str:
    """A chat answer's request id (its X-Request-Id)."""
    response = await chat(client, secret)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


async def give(client: httpx.AsyncClient, secret: str, **body: Any) -> httpx.Response:
    return await client.post("/v1/feedback", json=body, headers=bearer(secret))


async def listed(client: httpx.AsyncClient, secret: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/feedback", params=params, headers=bearer(secret))
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def two_teams(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """Teams alpha and beta, and a key of each."""
    await create_team(client, id="alpha")
    await create_team(client, id="beta")
    return await create_key(client, team_id="alpha"), await create_key(client, team_id="beta")


async def test_feedback_on_an_answer_just_given_is_kept_and_listed(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway()
    await create_team(client, id="alpha")
    a1, a2 = await create_key(client, team_id="alpha"), await create_key(client, team_id="alpha")
    first = await answered(client, a1["key"])  # its usage record is still in memory
    given = await give(
        client, a1["key"], request_id=first, score=1, label="helpful", metadata={"ui": "web"}
    )
    assert given.status_code == 201, given.text
    body = given.json()
    assert body["id"].startswith("fb_")
    assert body["object"] == "feedback"
    assert (body["request_id"], body["key_id"], body["team_id"]) == (first, a1["id"], "alpha")
    assert (body["score"], body["label"], body["comment"]) == (1.0, "helpful", None)
    assert body["metadata"] == {"ui": "web"}
    second = await answered(client, a2["key"])
    comment = "cites a paper that does not exist"
    assert (await give(client, a2["key"], request_id=second, comment=comment)).status_code == 201
    # A teammate may give feedback on another's answer of the team.
    assert (await give(client, a2["key"], request_id=first, score=-0.5)).status_code == 201

    everything = await listed(client, a1["key"])
    assert [(f["request_id"], f["key_id"]) for f in everything] == [
        (first, a2["id"]),
        (second, a2["id"]),
        (first, a1["id"]),
    ]  # newest first
    assert [f["score"] for f in await listed(client, a1["key"], request_id=first)] == [-0.5, 1.0]
    assert len(await listed(client, a1["key"], key_id=a1["id"])) == 1
    assert len(await listed(client, a1["key"], limit=2)) == 2


async def test_a_key_cannot_give_or_see_feedback_outside_its_team(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway()
    alpha, beta = await two_teams(client)
    loner = await create_key(client)
    theirs = await answered(client, alpha["key"])
    assert (await give(client, alpha["key"], request_id=theirs, score=1)).status_code == 201

    for outsider in (beta, loner):
        refused = await give(client, outsider["key"], request_id=theirs, score=0)
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("request_not_found", "request_id")
        assert await listed(client, outsider["key"]) == []
    for secret, params in (
        (beta["key"], {"key_id": alpha["id"]}),
        (loner["key"], {"key_id": alpha["id"]}),
    ):
        peek = await client.get("/v1/feedback", params=params, headers=bearer(secret))
        assert peek.status_code == 403
        assert peek.json()["error"]["param"] == "key_id"
    # A key without a team gives feedback on its own answers.
    own = await answered(client, loner["key"])
    assert (await give(client, loner["key"], request_id=own, label="ok")).status_code == 201
    assert [f["request_id"] for f in await listed(client, loner["key"])] == [own]


async def test_a_request_never_answered_is_not_found_and_says_why(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway()
    key = await create_key(client)
    refused = await give(client, key["key"], request_id="req-from-nowhere", score=1)
    assert refused.status_code == 404
    message = refused.json()["error"]["message"]
    assert "req-from-nowhere" in message
    assert "within 1 s" in message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"request_id": "r"}, None, "missing_required_parameter"),  # nothing to say
        ({"score": 1}, "request_id", "missing_required_parameter"),
        ({"request_id": "r", "score": "high"}, "score", "invalid_value"),
        ({"request_id": "r", "label": "x" * 65}, "label", "invalid_value"),
        ({"request_id": "r", "comment": ""}, "comment", "invalid_value"),
        ({"request_id": "r", "score": 1, "rating": 5}, "rating", "invalid_value"),
        ({"request_id": "r", "score": 1, "metadata": {"k": 1}}, "metadata.k", "invalid_value"),
    ],
)
async def test_bad_feedback_is_a_400_naming_the_field(
    gateway: GatewayFactory, body: dict[str, Any], param: str | None, code: str
) -> None:
    client, _ = await gateway()
    key = await create_key(client)
    refused = await client.post("/v1/feedback", json=body, headers=bearer(key["key"]))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


async def test_feedback_needs_a_key_and_usage_records(gateway: GatewayFactory) -> None:
    client, _ = await gateway(usage=UsageConfig(enabled=False))
    assert (await client.post("/v1/feedback", json={"request_id": "r"})).status_code == 401
    assert (await client.get("/v1/feedback")).status_code == 401
    request_id = await answered(client, AUTH["Authorization"].removeprefix("Bearer "))
    refused = await client.post(
        "/v1/feedback", json={"request_id": request_id, "score": 1}, headers=AUTH
    )
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "feedback_unavailable"


async def test_the_admin_key_lists_every_teams_feedback(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    alpha, beta = await two_teams(client)
    for key in (alpha, beta):
        request_id = await answered(client, key["key"])
        assert (await give(client, key["key"], request_id=request_id, score=1)).status_code == 201
    everyone = (await client.get("/admin/feedback", headers=AUTH)).json()["data"]
    assert [f["team_id"] for f in everyone] == ["beta", "alpha"]
    only = await client.get("/admin/feedback", params={"team_id": "alpha"}, headers=AUTH)
    assert [f["key_id"] for f in only.json()["data"]] == [alpha["id"]]
    assert (await client.get("/admin/feedback", headers=bearer(alpha["key"]))).status_code == 403
    across = await client.get(
        "/v1/feedback", params={"team_id": "beta"}, headers=bearer(alpha["key"])
    )
    assert across.status_code == 403
    assert across.json()["error"]["param"] == "team_id"
