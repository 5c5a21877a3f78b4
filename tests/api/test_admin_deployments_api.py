"""``GET /admin/deployments``: each model's deployments as the serving process sees them."""

from __future__ import annotations

import pytest

from headrace.api.admin import _without_credentials
from headrace.config import BreakerConfig, DeploymentConfig, ModelConfig
from tests.conftest import AUTH, GatewayFactory, echo_models
from tests.sockets import free_port

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def test_every_deployment_with_its_load_latency_breaker_and_price(
    gateway: GatewayFactory,
) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"
    gone = ModelConfig(
        name="gone",
        retry={"max_attempts": 1},
        breaker=BreakerConfig(failure_threshold=1, min_requests=1),
        deployments=[
            DeploymentConfig(
                provider="openai_compatible",
                model="up-1",
                base_url=refused,
                weight=3,
                max_concurrency=7,
                price={"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6},
            )
        ],
    )
    client, _ = await gateway(models=[*echo_models(), gone])
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)).is_success
    body = {**CHAT, "model": "gone"}
    assert (await client.post("/v1/chat/completions", json=body, headers=AUTH)).status_code >= 500

    listed = (await client.get("/admin/deployments", headers=AUTH)).json()
    by_name = {d["name"]: d for d in listed["data"]}
    assert list(by_name) == ["echo/0", "echo-embed/0", "gone/0"]
    echo = by_name["echo/0"]
    assert (echo["model"], echo["provider"], echo["upstream_model"]) == ("echo", "echo", "echo-1")
    assert echo["breaker"] == "closed"
    assert echo["in_flight"] == 0
    assert echo["latency_ewma_ms"] is not None
    assert by_name["echo-embed/0"]["capabilities"] == ["embeddings"]
    assert by_name["echo-embed/0"]["latency_ewma_ms"] is None  # never called
    failed = by_name["gone/0"]
    assert failed["breaker"] == "open"
    assert failed["base_url"] == refused
    assert (failed["weight"], failed["max_concurrency"]) == (3, 7)
    assert failed["price_per_mtok_usd"] == {"input": 0.15, "output": 0.6}


async def test_only_admin_keys(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    assert (await client.get("/admin/deployments")).status_code == 401
    user = await client.post("/admin/keys", json={"name": "u"}, headers=AUTH)
    headers = {"Authorization": f"Bearer {user.json()['key']}"}
    refused = await client.get("/admin/deployments", headers=headers)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (None, None),
        ("https://api.example.com/v1", "https://api.example.com/v1"),
        ("https://user:secret@api.example.com:8443/v1", "https://api.example.com:8443/v1"),
        ("http://token@[::1]:8000/v1", "http://[::1]:8000/v1"),
    ],
)
def test_a_url_is_shown_without_credentials(url: str | None, shown: str | None) -> None:
    assert _without_credentials(url) == shown
