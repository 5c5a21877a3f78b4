"""Two gateway processes sharing a Redis cache: one upstream call for 50 identical requests;
and a gateway whose Redis is down keeps serving."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server, free_port
from tests.e2e.conftest import serve as e2e_serve

pytestmark = pytest.mark.e2e

REDIS_URL = os.environ.get("HEADRACE_TEST_REDIS_URL")


def config(mock_url: str, redis_url: str) -> str:
    return f"""
cache:
  backend: redis
  redis_url: {redis_url}
models:
  - name: mock-model
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock_url}/v1
"""


def serve(root: Path, name: str, text: str) -> Server:
    path = root / f"{name}.yaml"
    path.write_text(text)
    return e2e_serve(path, root / f"{name}.log", root / name)


@pytest.fixture
def two_gateways(tmp_path: Path, mock_upstream: Server) -> Iterator[tuple[Server, Server]]:
    if not REDIS_URL:
        pytest.skip("set HEADRACE_TEST_REDIS_URL to run the cross-process cache test")
    text = config(mock_upstream.url, REDIS_URL)
    first, second = serve(tmp_path, "one", text), serve(tmp_path, "two", text)
    yield first, second
    first.stop()
    second.stop()


async def test_identical_requests_across_processes_make_one_upstream_call(
    two_gateways: tuple[Server, Server], mock_upstream: Server
) -> None:
    body = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": f"coalesce {uuid.uuid4()}"}],
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    httpx.put(f"{mock_upstream.url}/_mock/faults", json={"latency_ms": 500}).raise_for_status()
    httpx.post(f"{mock_upstream.url}/_mock/reset").raise_for_status()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{two_gateways[i % 2].url}/v1/chat/completions", json=body, headers=headers
                    )
                    for i in range(50)
                )
            )
    finally:
        httpx.put(f"{mock_upstream.url}/_mock/faults", json={}).raise_for_status()
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    stats = httpx.get(f"{mock_upstream.url}/_mock/stats").json()
    assert stats["endpoints"]["/v1/chat/completions"] == 1
    results = [r.headers["x-headrace-cache"] for r in responses]
    assert results.count("miss") == 1


def test_a_gateway_whose_redis_is_down_keeps_serving(tmp_path: Path, mock_upstream: Server) -> None:
    gateway = serve(
        tmp_path, "down", config(mock_upstream.url, f"redis://127.0.0.1:{free_port()}/0")
    )
    try:
        body = {
            "model": "mock-model",
            "messages": [{"role": "user", "content": "still here?"}],
            "temperature": 0,
        }
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for stream in (False, True):
            response = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json={**body, "stream": stream},
                headers=headers,
                timeout=10,
            )
            assert response.status_code == 200
            assert response.headers["x-headrace-cache"] == "bypass"
        ready = httpx.get(f"{gateway.url}/health/ready", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["cache"]["status"] == "failed"
    finally:
        gateway.stop()
