"""A client that leaves before its request body is complete, on a real socket through uvicorn:
a 499 (not an unhandled 500) and, for a tenant's key, one usage record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from structlog.testing import capture_logs

from headrace.api import create_app
from headrace.api.wire import validate_job
from headrace.domain import Role
from headrace.gateway.auth import new_key, new_secret
from headrace.wiring import Runtime, build_runtime
from headrace.worker.process import attach_workers
from tests.conftest import make_settings
from tests.e2e.conftest import free_port, in_process
from tests.fakes.recording_store import RecordingStore

pytestmark = pytest.mark.e2e

ROUTE = "/v1/chat/completions"
BOUNDARY = "hr-boundary"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Runtime, RecordingStore, int]]:
    """The app, jobs on, under uvicorn on 127.0.0.1 (its lifespan starts the runtime)."""
    store = RecordingStore()
    rt = build_runtime(make_settings(tmp_path), store=store, validate_job=validate_job)
    attach_workers(rt)
    port = free_port()
    config = uvicorn.Config(create_app(rt), host="127.0.0.1", port=port, log_config=None)
    async with in_process(config):
        yield rt, store, port


def answered(rt: Runtime, status: str, route: str = ROUTE) -> float:
    value = rt.metrics.registry.get_sample_value(
        "headrace_requests_total", {"route": route, "status": status}
    )
    return value or 0.0


async def send_and_leave(port: int, route: str, headers: str, partial: bytes) -> None:
    """Send the headers, promising 1000 bytes more than ``partial``, and close the socket."""
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
        f"Content-Length: {len(partial) + 1000}\r\n\r\n"
    )
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + partial)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def until_answered(rt: Runtime, route: str) -> None:
    """Until the middleware has counted the request, as a 499 or a 500."""
    async with asyncio.timeout(10):
        while not any(answered(rt, s, route) for s in ("499", "500")):
            await asyncio.sleep(0.01)


async def test_a_client_that_leaves_mid_body_is_a_499_with_a_usage_record(
    served: tuple[Runtime, RecordingStore, int], caplog: pytest.LogCaptureFixture
) -> None:
    rt, store, port = served
    secret = new_secret()
    key = new_key(secret, role=Role.USER, name="leaver")
    await store.put(key)
    headers = f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
    partial = b'{"model": "echo", "messages": [{"role": "user", "content": "hel'
    with capture_logs() as logs, caplog.at_level(logging.ERROR):
        await send_and_leave(port, ROUTE, headers, partial)
        await until_answered(rt, ROUTE)
    assert rt.usage is not None
    await rt.usage.flush()

    assert (answered(rt, "499"), answered(rt, "500")) == (1, 0)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    (record,) = store.records
    assert (record.key_id, record.operation, record.status, record.error) == (
        key.id,
        "chat",
        499,
        "ClientClosedError",
    )


async def test_a_client_that_leaves_mid_upload_is_a_499(
    served: tuple[Runtime, RecordingStore, int], caplog: pytest.LogCaptureFixture
) -> None:
    rt, store, port = served
    secret = new_secret()
    await store.put(new_key(secret, role=Role.USER, name="uploader"))
    headers = (
        f"Authorization: Bearer {secret}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
    )
    partial = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="requests.jsonl"\r\n\r\n{{"custom_id": "a", '
    ).encode()
    with capture_logs() as logs, caplog.at_level(logging.ERROR):
        await send_and_leave(port, "/v1/files", headers, partial)
        await until_answered(rt, "/v1/files")
    assert (answered(rt, "499", "/v1/files"), answered(rt, "500", "/v1/files")) == (1, 0)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
