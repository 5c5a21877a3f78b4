"""Shared fixtures: an in-process gateway on the echo provider, and backend URLs from the env."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from headrace.api import create_app
from headrace.config import DeploymentConfig, ModelConfig, Settings
from headrace.store.memory import MemoryKeyStore
from headrace.wiring import Runtime, build_runtime

ADMIN_KEY = "hr_test-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def echo_models(**options: Any) -> list[ModelConfig]:
    return [
        ModelConfig(
            name="echo",
            deployments=[DeploymentConfig(provider="echo", model="echo-1", options=options)],
        ),
        ModelConfig(
            name="echo-embed",
            capabilities=["embeddings"],
            deployments=[DeploymentConfig(provider="echo", model="echo-embed-1")],
        ),
    ]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "admin_key": ADMIN_KEY,
        "models": echo_models(),
    }
    values.update(overrides)
    return Settings(**values)


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Factory: ``await gateway(**settings_overrides)`` → (httpx client, runtime), started."""
    started: list[tuple[httpx.AsyncClient, Runtime]] = []

    async def factory(**overrides: Any) -> tuple[httpx.AsyncClient, Runtime]:
        rt = build_runtime(make_settings(tmp_path, **overrides), key_store=MemoryKeyStore())
        app = create_app(rt)
        await rt.start()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://headrace.test"
        )
        started.append((client, rt))
        return client, rt

    yield factory
    for client, rt in started:
        await client.aclose()
        await rt.stop()


@pytest.fixture
def database_url() -> str | None:
    return os.environ.get("HEADRACE_TEST_DATABASE_URL")


@pytest.fixture
def redis_url() -> str | None:
    return os.environ.get("HEADRACE_TEST_REDIS_URL")
