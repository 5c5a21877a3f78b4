"""The database going away under a running gateway: 503 and Retry-After, not an internal error.

The gateway's store is a PostgreSQL server of the test's own (:mod:`tests.private_postgres`),
stopped and started again while the gateway runs.
"""

from __future__ import annotations

import httpx
from structlog.testing import capture_logs

from headrace.store.sql import SqlStore
from tests.conftest import AUTH, GatewayFactory
from tests.private_postgres import PrivatePostgres

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_a_request_that_needs_the_database_while_it_is_down_gets_503(
    gateway: GatewayFactory, private_postgres: PrivatePostgres
) -> None:
    client, _ = await gateway(store=SqlStore(private_postgres.url))
    created = await client.post("/admin/keys", json={"name": "k"}, headers=AUTH)
    assert created.status_code == 201, created.text
    secret = created.json()["key"]

    private_postgres.stop()
    with capture_logs() as logs:
        # A key this process has not looked up yet: its lookup needs the database.
        down = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        listed = await client.get("/admin/keys", headers=AUTH)
        feedback = await client.post(
            "/v1/feedback", json={"request_id": "r", "score": 1}, headers=AUTH
        )
        feedback_listed = await client.get("/v1/feedback", headers=AUTH)
    for response in (down, listed, feedback, feedback_listed):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "store_unavailable")
    assert "key store is unreachable" in down.json()["error"]["message"]
    assert "database is unavailable" in listed.json()["error"]["message"]
    events = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    # The admin call's and the two feedback calls'; the key lookup says it in its 503.
    assert events == ["store_unavailable"] * 3

    private_postgres.start()
    answers = [await chat(client, secret) for _ in range(3)]
    # The pool's connections died with the server: at most the first request meets one.
    assert answers[-1].status_code == 200, answers[-1].text


async def chat(client: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
