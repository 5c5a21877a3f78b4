"""``headrace bench`` against a real ``headrace serve`` in front of ``headrace mock-upstream``."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server

pytestmark = pytest.mark.e2e


def bench(gateway: Server, *args: str, key: str = ADMIN_KEY) -> tuple[int, str]:
    """Run the command; its exit status and what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "headrace", "bench", "--url", gateway.url, "--key", key, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def figures(gateway: Server, *args: str, key: str = ADMIN_KEY) -> tuple[int, dict[str, Any]]:
    status, output = bench(gateway, "--json", *args, key=key)
    summary: dict[str, Any] = json.loads(output)
    return status, summary


def mock_total(mock: Server) -> int:
    return int(httpx.get(f"{mock.url}/_mock/stats", timeout=10).json()["total"])


def test_a_closed_loop_answers_every_request_and_reports_the_figures(
    gateway: Server, mock_upstream: Server
) -> None:
    before = mock_total(mock_upstream)
    status, summary = figures(
        gateway, "--model", "mock-model", "--requests", "30", "--concurrency", "5"
    )
    assert status == 0, summary
    assert (summary["requests"], summary["ok"], summary["failed"]) == (30, 30, 0)
    assert mock_total(mock_upstream) - before == 30  # every one reached the upstream
    assert summary["mode"] == "closed loop of 5"
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert summary["answers_per_s"] > 0
    assert summary["output_tokens"] > 0
    assert summary["ttft_ms"] is None
    assert summary["failures"] == {}


def test_an_open_loop_streams_at_the_rate_with_time_to_first_token(gateway: Server) -> None:
    status, summary = figures(
        gateway, "--model", "mock-model", "--requests", "20", "--rate", "40", "--stream"
    )
    assert status == 0, summary
    assert summary["ok"] == 20
    assert summary["mode"] == "open loop at 40/s"
    assert summary["elapsed_s"] >= 19 / 40  # the last request was due 0.475 s in
    ttft = summary["ttft_ms"]
    assert 0 < ttft["p50"] <= summary["latency_ms"]["p50"]
    assert summary["output_tokens"] > 0  # from the stream's usage chunk


def test_failures_are_counted_by_status_and_code_and_exit_1(gateway: Server) -> None:
    status, summary = figures(gateway, "--model", "mock-model", "--requests", "4", key="hr_nope")
    assert status == 1
    assert (summary["ok"], summary["failed"]) == (0, 4)
    assert summary["failures"] == {"401 invalid_api_key": 4}
    status, summary = figures(gateway, "--model", "no-such-model", "--requests", "3")
    assert status == 1
    assert summary["failures"] == {"404 model_not_found": 3}


def test_the_table_names_each_figure(gateway: Server) -> None:
    status, output = bench(gateway, "--model", "mock-model", "--requests", "5")
    assert status == 0, output
    assert "5 non-streamed chat completions of mock-model" in output
    assert "answered / failed       5 / 0" in output
    assert "latency (ms)" in output
    assert "p50 / p90 / p99 / max" in output
