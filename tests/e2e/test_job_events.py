"""Job event streams follow changes another process makes: a real ``headrace serve`` that runs
no jobs streams ``GET /v1/jobs/{id}/events`` while a ``headrace worker`` process runs them, on
one SQLite file and on PostgreSQL. The gateway's one watch (jobs/watch.py) must wake every
stream, each exactly with its own job's events, in order."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import fresh_database
from tests.e2e.conftest import ADMIN_KEY, Server, serve, worker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
JOBS = 20
DATABASE_URL = os.environ.get("HEADRACE_TEST_DATABASE_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None: the data directory's SQLite file; else a fresh PostgreSQL database, migrated."""
    if request.param == "sqlite":
        yield None
        return
    if not DATABASE_URL:
        pytest.skip("set HEADRACE_TEST_DATABASE_URL to run against PostgreSQL")
    with fresh_database(DATABASE_URL) as url:
        subprocess.run(
            [sys.executable, "-m", "headrace", "migrate"],
            env={**os.environ, "HEADRACE_DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        yield url


def _config(root: Path, mock: Server, database: str | None) -> Path:
    path = root / "headrace.yaml"
    store = f'database_url: "{database}"\n' if database else ""
    path.write_text(
        f"""{store}log: {{format: json, access_log: false}}
jobs: {{run_in_process: false, events_poll_s: 0.1}}
models:
  - name: mock-model
    cache: {{enabled: false}}
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock.url}/v1
"""
    )
    return path


async def _follow(client: httpx.AsyncClient, job_id: str, opened: asyncio.Event) -> list[str]:
    events = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=AUTH) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                assert f'"job_id":"{job_id}"' in line
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
                opened.set()
    return events


async def test_streams_follow_the_jobs_a_worker_process_runs(
    tmp_path: Path, mock_upstream: Server, database: str | None
) -> None:
    config = _config(tmp_path, mock_upstream, database)
    gateway = serve(config, tmp_path / "serve.log", tmp_path / "data")
    running: list[Server] = [gateway]
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            ids = []
            for n in range(JOBS):
                body = {"model": "mock-model", "messages": [{"role": "user", "content": f"{n}"}]}
                answer = await client.post("/v1/jobs", json={"body": body}, headers=AUTH)
                assert answer.status_code == 202
                ids.append(answer.json()["id"])
            opened = [asyncio.Event() for _ in ids]
            streams = [
                asyncio.ensure_future(_follow(client, job_id, event))
                for job_id, event in zip(ids, opened, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 30)
            # No process runs jobs yet: every stream waits on the gateway's watch.
            await asyncio.sleep(0.5)
            assert not any(stream.done() for stream in streams)
            running.append(await asyncio.to_thread(worker, tmp_path, config, "worker", 50))
            # Well inside the streams' 15 s keep-alive, after which each would read its events
            # again by itself: the watch's poll woke them.
            followed = await asyncio.wait_for(asyncio.gather(*streams), 10)
        assert followed == [["job.queued", "job.running", "job.succeeded"]] * JOBS
        assert "job_watch_failed" not in gateway.output()
    finally:
        for server in reversed(running):
            server.stop()
