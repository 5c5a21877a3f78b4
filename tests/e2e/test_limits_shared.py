"""Two gateway processes sharing Redis (limits) and PostgreSQL (keys, usage): one RPM limit,
one TPM limit and one budget held exactly under concurrent load, revocation across processes
within the key-cache TTL, and one usage record per request, none lost or doubled."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import fresh_database
from tests.e2e.conftest import ADMIN_KEY, Server, serve

pytestmark = pytest.mark.e2e

REDIS_URL = os.environ.get("HEADRACE_TEST_REDIS_URL")
DATABASE_URL = os.environ.get("HEADRACE_TEST_DATABASE_URL")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Mock prices: $1 per million input tokens, $2 per million output tokens → micro-dollars per
# request = prompt words + 2 x completion tokens.
CONFIG = """
auth: {{key_cache_ttl_s: 1}}
limits: {{backend: redis, redis_url: "{redis}"}}
database_url: "{database}"
models:
  - name: mock-model
    retry: {{max_attempts: 1}}
    cache: {{enabled: false}}
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock}/v1
        price: {{input_per_mtok_usd: 1.0, output_per_mtok_usd: 2.0}}
"""


@dataclass
class Cluster:
    gateways: tuple[Server, Server]
    database_url: str

    def url(self, i: int) -> str:
        return self.gateways[i % 2].url


def _run(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "headrace", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A brand-new PostgreSQL database for this module's two gateways."""
    if not (DATABASE_URL and REDIS_URL):
        pytest.skip("set HEADRACE_TEST_DATABASE_URL and HEADRACE_TEST_REDIS_URL")
    with fresh_database(DATABASE_URL) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, mock_upstream: Server, database: str
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("shared-limits")
    config = root / "headrace.yaml"
    config.write_text(CONFIG.format(redis=REDIS_URL, database=database, mock=mock_upstream.url))
    env = {"HEADRACE_ADMIN_KEY": ADMIN_KEY}
    # Production mode: PostgreSQL is migrated by the operator, not by the gateways.
    _run("migrate", "--config", str(config), env=env)
    servers = []
    for name in ("a", "b"):
        servers.append(serve(config, root / f"{name}.log", root / name))
    yield Cluster((servers[0], servers[1]), database)
    for server in servers:
        server.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as c:
        yield c


async def new_key(client: httpx.AsyncClient, cluster: Cluster, **fields: Any) -> str:
    team = f"team-{uuid.uuid4().hex[:8]}"
    team_fields = fields.pop("team", {})
    created = await client.post(
        f"{cluster.url(0)}/admin/teams",
        json={"id": team, "name": team, **team_fields},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    key = await client.post(
        f"{cluster.url(0)}/admin/keys",
        json={"name": "load", "team_id": team, **fields},
        headers=ADMIN,
    )
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


def chat(words: int = 5, max_tokens: int = 10) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": " ".join(["word"] * words)}],
        "max_tokens": max_tokens,
    }


async def burst(
    client: httpx.AsyncClient, cluster: Cluster, secret: str, n: int, body: dict[str, Any]
) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {secret}"}
    return await asyncio.gather(
        *(
            client.post(f"{cluster.url(i)}/v1/chat/completions", json=body, headers=headers)
            for i in range(n)
        )
    )


async def test_two_processes_hold_one_rpm_limit_exactly(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    secret = await new_key(client, cluster, rpm=30)
    started = time.monotonic()
    responses = await burst(client, cluster, secret, 90, chat())
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}
    allowed = statuses.count(200)
    # 30 at once, plus what the leaky bucket drained (30/min) while the burst ran.
    assert 30 <= allowed <= 30 + math.ceil(elapsed * 30 / 60)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert '"key-rpm";q=30;w=60' in refused.headers["ratelimit-policy"]
    ok = next(r for r in responses if r.status_code == 200)
    assert '"key-rpm";r=' in ok.headers["ratelimit"]
    # Both processes refused some: the limit is shared, not per process.
    assert {r.url.port for r in responses if r.status_code == 429} == {
        httpx.URL(s.url).port for s in cluster.gateways
    }


async def test_two_processes_hold_one_tpm_limit_on_real_usage(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    secret = await new_key(client, cluster, tpm=600)
    started = time.monotonic()
    responses = await burst(client, cluster, secret, 60, chat(words=5, max_tokens=20))
    elapsed = time.monotonic() - started
    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) < len(responses), "the TPM limit never refused"
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    assert used <= 600 + math.ceil(elapsed * 600 / 60)
    assert {r.json()["error"]["type"] for r in responses if r.status_code == 429} == {"tokens"}


async def test_one_budget_across_processes_under_50_concurrent_requests(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    # Each request: 5 prompt words + 2 x 20 output tokens = 45 micro-dollars; the estimate
    # (tokenizer prompt + max_tokens) is an upper bound of it.
    budget_usd = 0.000500
    secret = await new_key(client, cluster, team={"budget_usd": budget_usd})
    responses = await burst(client, cluster, secret, 50, chat(words=5, max_tokens=20))
    statuses = [r.status_code for r in responses]
    assert 402 in statuses
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 402} == {
        "budget_exceeded"
    }
    spent = sum(float(r.headers["x-headrace-cost-usd"]) for r in responses if r.status_code == 200)
    one_request = 45e-6
    assert spent <= budget_usd + one_request
    # Concurrency made the reservations pessimistic; sequential requests use up the rest.
    while True:
        (last,) = await burst(client, cluster, secret, 1, chat(words=5, max_tokens=20))
        if last.status_code != 200:
            assert last.status_code == 402
            break
        spent += float(last.headers["x-headrace-cost-usd"])
    assert budget_usd - one_request * 2 < spent <= budget_usd + one_request


async def test_revoked_key_stops_working_everywhere_within_the_cache_ttl(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    secret = await new_key(client, cluster)
    headers = {"Authorization": f"Bearer {secret}"}
    for i in range(2):  # both processes have it cached now
        ok = await client.post(
            f"{cluster.url(i)}/v1/chat/completions", json=chat(), headers=headers
        )
        assert ok.status_code == 200
    keys = (await client.get(f"{cluster.url(0)}/admin/keys", headers=ADMIN)).json()["data"]
    key_id = next(k["id"] for k in keys if secret.startswith(k["prefix"]))
    revoked_at = time.monotonic()
    revoked = await client.post(f"{cluster.url(0)}/admin/keys/{key_id}/revoke", headers=ADMIN)
    assert revoked.status_code == 200
    at_once = await client.post(
        f"{cluster.url(0)}/v1/chat/completions", json=chat(), headers=headers
    )
    assert at_once.status_code == 401  # the process that revoked forgets at once
    while True:  # the other one within auth.key_cache_ttl_s (1 s here)
        other = await client.post(
            f"{cluster.url(1)}/v1/chat/completions", json=chat(), headers=headers
        )
        if other.status_code == 401:
            break
        assert time.monotonic() - revoked_at < 1.5
        await asyncio.sleep(0.05)


async def test_every_request_has_exactly_one_usage_record(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    secret = await new_key(client, cluster, rpm=40)
    responses = await burst(client, cluster, secret, 100, chat())
    team = await client.get(
        f"{cluster.url(0)}/v1/usage", headers={"Authorization": f"Bearer {secret}"}
    )
    assert team.status_code == 200
    deadline = time.monotonic() + 10
    engine = create_async_engine(cluster.database_url)
    try:
        while True:
            async with engine.connect() as conn:
                rows = (
                    await conn.execute(
                        text(
                            "SELECT status, count(*) FROM usage_records r JOIN api_keys k "
                            "ON k.id = r.key_id WHERE k.prefix = :prefix GROUP BY status"
                        ),
                        {"prefix": secret[:8]},
                    )
                ).all()
            counts = {int(status): int(n) for status, n in rows}
            if sum(counts.values()) >= len(responses) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
    expected: dict[int, int] = {}
    for r in responses:
        expected[r.status_code] = expected.get(r.status_code, 0) + 1
    assert counts == expected
