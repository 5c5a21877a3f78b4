"""Real processes on real sockets: ``headrace mock-upstream`` and ``headrace serve``.

Both run once per test session (the local chat model takes a second to load); tests talk to
them with the official ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from tests.sockets import free_port

ADMIN_KEY = "hr_e2e-admin-key"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start(
    args: list[str],
    health_url: str,
    log: Path,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
) -> Server:
    """Start ``python -m headrace ARGS`` and wait until ``health_url`` answers 200.

    The child gets this process's environment plus ``env``, minus the names in ``unset``.
    """
    child_env = {k: v for k, v in os.environ.items() if k not in unset}
    child_env.update(env or {})
    with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "headrace", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
    server = Server(process, health_url.rsplit("/", 2)[0], log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"headrace {args[0]} exited early:\n{server.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health_url, timeout=1).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"headrace {args[0]} did not become healthy:\n{server.output()}")


@contextlib.asynccontextmanager
async def in_process(config: uvicorn.Config) -> AsyncIterator[uvicorn.Server]:
    """uvicorn serving ``config`` in this test's event loop, started and, on exit, stopped."""
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:
            assert not serving.done(), "uvicorn stopped before it started"
            await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await serving


def serve(config: Path, log: Path, data_dir: Path, env: dict[str, str] | None = None) -> Server:
    """``headrace serve --config CONFIG`` on a free port with the e2e admin key and its data in
    ``data_dir``, once ``/health/live`` answers; ``env`` adds to (or overrides) that."""
    port = free_port()
    return start(
        ["serve", "--config", str(config), "--port", str(port)],
        f"http://127.0.0.1:{port}/health/live",
        log,
        env={"HEADRACE_ADMIN_KEY": ADMIN_KEY, "HEADRACE_DATA_DIR": str(data_dir), **(env or {})},
    )


def worker(root: Path, config: Path, name: str, concurrency: int) -> Server:
    """``headrace worker`` (no HTTP API): started once it says it is running."""
    log = root / f"{name}.log"
    argv = ["worker", "--config", str(config), "--concurrency", str(concurrency)]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "headrace", *argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HEADRACE_DATA_DIR": str(root / "data")},
        )
    server = Server(process, "", log)
    deadline = time.monotonic() + 60
    while "headrace worker running" not in server.output():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"headrace worker did not start:\n{server.output()}")
        time.sleep(0.1)
    return server


@pytest.fixture(scope="session")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("mock") / "mock.log"
    server = start(
        ["mock-upstream", "--port", str(port), "--seed", "7"],
        f"http://127.0.0.1:{port}/health",
        log,
    )
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


def gateway_config(mock_url: str) -> str:
    return f"""
log:
  format: json
models:
  - name: mock-model
    # One attempt and a lenient breaker: these tests look at single-call error mapping;
    # tests/e2e/test_reliability.py covers retries, breakers and fallbacks.
    retry: {{max_attempts: 1}}
    breaker: {{failure_threshold: 1000, min_requests: 1000}}
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock_url}/v1
        api_key_env: HEADRACE_E2E_UPSTREAM_KEY
        timeouts: {{connect_s: 2, first_token_s: 3, total_s: 10}}
  - name: smollm2-135m-instruct
    deployments:
      - provider: local
        model: smollm2-135m-instruct
        options: {{instances: 1, n_ctx: 2048}}
  - name: all-minilm-l6-v2
    capabilities: [embeddings]
    deployments:
      - provider: local_embeddings
        model: all-minilm-l6-v2
  - name: mock-embed
    capabilities: [embeddings]
    deployments:
      - provider: openai_compatible
        model: mock-embed
        base_url: {mock_url}/v1
"""


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, mock_upstream: Server) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("gateway")
    config = root / "headrace.yaml"
    config.write_text(gateway_config(mock_upstream.url))
    server = serve(
        config,
        root / "serve.log",
        root / "data",
        {
            "HEADRACE_E2E_UPSTREAM_KEY": "sk-upstream-secret-never-shown",
            "HEADRACE_SERVER__MAX_BODY_BYTES": "65536",
        },
    )
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _close_sdk_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every sync ``openai.OpenAI`` client a test made, at the test's end.

    Tests build short-lived clients inline; left to the garbage collector, their pooled
    sockets raise ResourceWarning in whichever later test happens to collect them.
    """
    made: list[openai.OpenAI] = []
    init = openai.OpenAI.__init__

    def remember(self: openai.OpenAI, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(openai.OpenAI, "__init__", remember)
    yield
    for client in made:
        client.close()
