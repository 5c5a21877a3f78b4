"""The response cache through the HTTP edge, on the echo provider."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from headrace.domain import Role
from headrace.gateway.auth import new_key, new_secret
from tests.conftest import AUTH, GatewayFactory

pytest.importorskip("headrace.cache.memory")

BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0}


def upstream_calls(rt: object) -> int:
    return rt.gateway.router.slots("echo")[0].provider.calls  # type: ignore[attr-defined]


async def post(client, body=BODY, headers=None):  # type: ignore[no-untyped-def]
    return await client.post("/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})})


async def test_a_deterministic_request_is_answered_from_the_cache(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    first = await post(client)
    second = await post(client)
    assert first.headers["x-headrace-cache"] == "miss"
    assert second.headers["x-headrace-cache"] == "hit"
    assert second.json() == first.json()
    assert upstream_calls(rt) == 1


async def test_non_deterministic_requests_bypass_the_cache(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    body = {**BODY, "temperature": 0.7}
    for _ in range(2):
        response = await post(client, body)
        assert response.headers["x-headrace-cache"] == "bypass"
    assert upstream_calls(rt) == 2


async def test_cache_control(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    # no-store: answered, not kept.
    assert (await post(client, headers={"Cache-Control": "no-store"})).headers[
        "x-headrace-cache"
    ] == "miss"
    assert (await post(client)).headers["x-headrace-cache"] == "miss"
    assert upstream_calls(rt) == 2
    # no-cache: not read (a fresh answer) but written.
    response = await post(client, headers={"Cache-Control": "no-cache"})
    assert response.headers["x-headrace-cache"] == "bypass"
    assert upstream_calls(rt) == 3
    # max-age: only entries young enough.
    await asyncio.sleep(0.05)
    assert (await post(client, headers={"Cache-Control": "max-age=0"})).headers[
        "x-headrace-cache"
    ] == "miss"
    assert (await post(client, headers={"Cache-Control": "max-age=60"})).headers[
        "x-headrace-cache"
    ] == "hit"
    bad = await post(client, headers={"Cache-Control": "max-age=soon"})
    assert bad.status_code == 400


async def test_tenants_never_share_entries(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    other = new_secret()
    await rt.store.put(new_key(other, role=Role.USER, name="other team"))
    await post(client)
    response = await client.post(
        "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {other}"}
    )
    assert response.headers["x-headrace-cache"] == "miss"
    assert upstream_calls(rt) == 2


def sse_events(text: str) -> list[bytes]:
    return [line[6:].encode() for line in text.split("\n\n") if line.startswith("data: ")]


async def test_streams_are_cached_and_replayed(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    first = await post(client, body)
    second = await post(client, body)
    assert first.headers["x-headrace-cache"] == "miss"
    assert second.headers["x-headrace-cache"] == "hit"
    assert upstream_calls(rt) == 1
    replay = sse_events(second.text)
    assert replay[-1] == b"[DONE]"
    assert [orjson.loads(e) for e in replay[:-1]] == [
        orjson.loads(e) for e in sse_events(first.text)[:-1]
    ]
    # Without include_usage the replay drops the usage chunk, as a live stream does.
    plain = await post(client, {**BODY, "stream": True})
    assert plain.headers["x-headrace-cache"] == "hit"
    assert all(b'"usage"' not in e for e in sse_events(plain.text))


async def test_identical_requests_in_flight_share_one_upstream_call(
    gateway: GatewayFactory,
) -> None:
    from headrace.config import DeploymentConfig, ModelConfig

    slow = [
        ModelConfig(
            name="echo",
            deployments=[DeploymentConfig(provider="echo", model="e", options={"delay_s": 0.2})],
        )
    ]
    client, rt = await gateway(models=slow)
    responses = await asyncio.gather(*(post(client) for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    assert upstream_calls(rt) == 1
    results = [r.headers["x-headrace-cache"] for r in responses]
    assert results.count("miss") == 1
    assert results.count("hit") == 49
    # Streams too: followers receive the leader's chunks.
    stream = {**BODY, "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    streams = await asyncio.gather(*(post(client, stream) for _ in range(20)))
    assert upstream_calls(rt) == 2
    texts = {r.text.replace("\n", "") for r in streams}
    assert len(texts) == 1


async def test_admin_cache_stats_and_purge(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    await post(client)
    stats = (await client.get("/admin/cache", headers=AUTH)).json()
    assert stats["entries"] == 1
    assert stats["bytes"] > 0
    assert stats["requests"]["miss"] == 1
    purged = await client.delete("/admin/cache", params={"model": "echo"}, headers=AUTH)
    assert purged.json()["purged"] == 1
    assert (await post(client)).headers["x-headrace-cache"] == "miss"
    user = new_secret()
    await rt.store.put(new_key(user, role=Role.USER, name="user"))
    forbidden = await client.get("/admin/cache", headers={"Authorization": f"Bearer {user}"})
    assert forbidden.status_code == 403
    metrics = (await client.get("/metrics")).text
    assert 'headrace_cache_requests_total{result="miss"}' in metrics
    assert "headrace_cache_bytes" in metrics


async def test_a_key_can_turn_the_cache_off_or_widen_it(gateway: GatewayFactory) -> None:
    import dataclasses

    client, rt = await gateway()
    off, everything = new_secret(), new_secret()
    await rt.store.put(
        dataclasses.replace(
            new_key(off, role=Role.USER, name="no cache"), metadata={"cache": "off"}
        )
    )
    await rt.store.put(
        dataclasses.replace(
            new_key(everything, role=Role.USER, name="cache all"), metadata={"cache": "all"}
        )
    )
    for _ in range(2):
        response = await client.post(
            "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {off}"}
        )
        assert response.headers["x-headrace-cache"] == "bypass"
    warm = {**BODY, "temperature": 0.9}
    results = []
    for _ in range(2):
        response = await client.post(
            "/v1/chat/completions", json=warm, headers={"Authorization": f"Bearer {everything}"}
        )
        results.append(response.headers["x-headrace-cache"])
    assert results == ["miss", "hit"]
    assert upstream_calls(rt) == 3


async def test_cost_header_and_metric(gateway: GatewayFactory) -> None:
    from headrace.config import DeploymentConfig, ModelConfig, PriceConfig

    priced = [
        ModelConfig(
            name="echo",
            deployments=[
                DeploymentConfig(
                    provider="echo",
                    model="e",
                    price=PriceConfig(input_per_mtok_usd=2.5, output_per_mtok_usd=10),
                )
            ],
        )
    ]
    client, _ = await gateway(models=priced)
    first = await post(client)  # 2 prompt + 2 completion words: 5 + 20 micro-dollars
    assert first.headers["x-headrace-cost-usd"] == "0.000025"
    hit = await post(client)
    assert hit.headers["x-headrace-cost-usd"] == "0.000000"
    metrics = (await client.get("/metrics")).text
    assert 'headrace_cost_usd_total{key="admin-env",model="echo"} 2.5e-05' in metrics
    assert "headrace_cache_saved_cost_usd_total 2.5e-05" in metrics


async def test_coalesced_followers_count_the_cost_they_saved(gateway: GatewayFactory) -> None:
    from headrace.config import DeploymentConfig, ModelConfig, PriceConfig

    priced = [
        ModelConfig(
            name="echo",
            deployments=[
                DeploymentConfig(
                    provider="echo",
                    model="e",
                    price=PriceConfig(input_per_mtok_usd=2.5, output_per_mtok_usd=10),
                    options={"delay_s": 0.2},
                )
            ],
        )
    ]
    client, _ = await gateway(models=priced)
    # 5 JSON requests and 5 streams, each group led by one upstream call (25 micro-dollars).
    stream = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    await asyncio.gather(
        *(post(client) for _ in range(5)), *(post(client, stream) for _ in range(5))
    )
    metrics = (await client.get("/metrics")).text
    assert "headrace_cache_saved_cost_usd_total 0.0002" in metrics  # 8 followers x 25 µ$
