"""A gateway whose PostgreSQL goes away mid-load and comes back: every request still gets one
usage record in the database, none lost and none doubled (spooled, then replayed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import fresh_database
from tests.e2e.conftest import ADMIN_KEY, Server, serve
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

DATABASE_URL = os.environ.get("HEADRACE_TEST_DATABASE_URL")
CONFIG = """
database_url: "{database}"
store: {{migrate_on_start: false}}
usage: {{flush_interval_s: 0.05, batch_size: 50}}
models:
  - name: mock-model
    cache: {{enabled: false}}
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock}/v1
"""


@pytest.fixture
def database() -> Iterator[str]:
    if not DATABASE_URL:
        pytest.skip("set HEADRACE_TEST_DATABASE_URL to run against PostgreSQL")
    with fresh_database(DATABASE_URL) as url:
        yield url


async def count(database: str) -> tuple[int, int]:
    engine = create_async_engine(database)
    try:
        async with engine.connect() as conn:
            records = (await conn.execute(text("SELECT count(*) FROM usage_records"))).scalar()
            daily = (await conn.execute(text("SELECT sum(requests) FROM usage_daily"))).scalar()
    finally:
        await engine.dispose()
    return int(records or 0), int(daily or 0)


async def test_database_outage_mid_load_loses_and_doubles_no_usage_record(
    tmp_path: Path, mock_upstream: Server, database: str
) -> None:
    subprocess.run(
        [sys.executable, "-m", "headrace", "migrate"],
        env={**os.environ, "HEADRACE_DATABASE_URL": database},
        check=True,
        capture_output=True,
    )
    real = sqlalchemy.make_url(database)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    await proxy.start()
    through_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
    config = tmp_path / "headrace.yaml"
    config.write_text(CONFIG.format(database=through_proxy, mock=mock_upstream.url))
    gateway = await asyncio.to_thread(serve, config, tmp_path / "serve.log", tmp_path / "data")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hello there"}]}
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:

            async def load(n: int) -> None:
                for _ in range(n):
                    answer = await client.post("/v1/chat/completions", json=body, headers=headers)
                    statuses.append(answer.status_code)
                    await asyncio.sleep(0.005)

            await asyncio.gather(*(load(40) for _ in range(4)))  # database up
            await proxy.cut()  # PostgreSQL goes away mid-load
            await asyncio.gather(*(load(40) for _ in range(4)))
            ready = await client.get("/health/ready")
            assert ready.json()["checks"]["usage"]["status"] == "failed"
            assert ready.status_code == 200  # degraded, still serving
            spool = list((tmp_path / "data" / "spool").glob("usage-*.jsonl"))
            assert spool, "nothing was spooled while the database was down"
            proxy.restore()
            await asyncio.gather(*(load(40) for _ in range(4)))
    finally:
        assert await asyncio.to_thread(gateway.stop) == 0  # clean shutdown flushes the buffer
        await proxy.aclose()
    assert statuses == [200] * len(statuses)
    assert len(statuses) == 480
    assert await count(database) == (480, 480)
