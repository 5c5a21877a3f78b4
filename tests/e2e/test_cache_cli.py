"""``headrace cache stats|purge`` against a running gateway."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headrace", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cache_stats_and_purge(gateway: Server) -> None:
    body = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "cache me"}],
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for _ in range(2):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers)
    stats = cli("cache", "stats", "--url", gateway.url, "--admin-key", ADMIN_KEY)
    assert stats.returncode == 0, stats.stderr
    assert "hit" in stats.stdout
    purge = cli(
        "cache", "purge", "--model", "mock-model", "--url", gateway.url, "--admin-key", ADMIN_KEY
    )
    assert purge.returncode == 0, purge.stderr
    assert "purged 1 entries" in purge.stdout
    refused = cli("cache", "purge", "--url", gateway.url, "--admin-key", ADMIN_KEY)
    assert refused.returncode == 2
    wrong = cli("cache", "stats", "--url", gateway.url, "--admin-key", "hr_wrong")
    assert wrong.returncode == 1
    assert "HTTP 401" in wrong.stderr
    down = cli("cache", "stats", "--url", "http://127.0.0.1:9", "--admin-key", ADMIN_KEY)
    assert down.returncode == 1
    assert "Cannot reach Headrace" in down.stderr
