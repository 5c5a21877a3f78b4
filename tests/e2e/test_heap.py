"""The garbage collector's settings in real ``headrace serve`` and ``headrace worker`` processes.

Once started, each process freezes the objects it holds and raises the young generation's
threshold (``server.gc_freeze``, ``server.gc_threshold``; ``headrace/cli/heap.py``). The
gateway reports the frozen objects in ``/metrics``; both log ``heap_settled``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server, worker
from tests.e2e.conftest import serve as e2e_serve

pytestmark = pytest.mark.e2e

ECHO = """
log: {format: json}
models:
  - name: echo
    deployments: [{provider: echo, model: e}]
"""


def metric(server: Server, name: str) -> float:
    text = httpx.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def settled(server: Server) -> dict[str, object]:
    """The process's ``heap_settled`` log event."""
    for line in server.output().splitlines():
        if '"heap_settled"' in line:
            event: dict[str, object] = json.loads(line)
            return event
    raise AssertionError(f"no heap_settled event:\n{server.output()}")


def serve(root: Path, env: dict[str, str]) -> Server:
    config = root / "headrace.yaml"
    config.write_text(ECHO)
    return e2e_serve(config, root / "serve.log", root / "data", env)


def test_the_gateway_freezes_its_start_up_objects_and_raises_the_threshold(
    tmp_path: Path,
) -> None:
    server = serve(tmp_path, {})
    try:
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        assert metric(server, "headrace_gc_frozen_objects") > 10_000
        assert metric(server, "process_resident_memory_bytes") > 0
        event = settled(server)
        assert event["gc_threshold"] == 10_000
        assert isinstance(event["frozen_objects"], int)
        assert event["frozen_objects"] > 10_000
    finally:
        assert server.stop() == 0


def test_the_collector_as_python_has_it_when_configured_so(tmp_path: Path) -> None:
    env = {"HEADRACE_SERVER__GC_FREEZE": "false", "HEADRACE_SERVER__GC_THRESHOLD": "700"}
    server = serve(tmp_path, env)
    try:
        assert metric(server, "headrace_gc_frozen_objects") == 0
        event = settled(server)
        assert event["gc_threshold"] == 700
        assert event["frozen_objects"] == 0
    finally:
        assert server.stop() == 0


def test_a_worker_settles_its_heap_once_started(tmp_path: Path) -> None:
    config = tmp_path / "headrace.yaml"
    config.write_text(ECHO + "server: {gc_threshold: 5000}\n")
    process = worker(tmp_path, config, "worker", concurrency=2)
    try:
        event = settled(process)
        assert event["gc_threshold"] == 5000
        assert isinstance(event["frozen_objects"], int)
        assert event["frozen_objects"] > 10_000
    finally:
        assert process.stop() == 0
