"""Shared fixtures: an in-process gateway on the echo provider, and backend URLs from the env."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy

from headrace.api import create_app
from headrace.api.wire import validate_job
from headrace.config import DeploymentConfig, ModelConfig, Settings
from headrace.store.memory import MemoryStore
from headrace.wiring import Runtime, build_runtime
from headrace.worker.process import attach_workers

pytest_plugins = ["tests.private_postgres"]  # the private_postgres fixture

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
    """Factory: ``await gateway(**settings_overrides)`` → (httpx client, runtime), started.

    ``store=`` replaces the default :class:`MemoryStore`; ``tracing=`` (a
    :class:`~headrace.observability.tracing.Tracing`) turns traces on.
    """
    started: list[tuple[httpx.AsyncClient, Runtime]] = []

    async def factory(**overrides: Any) -> tuple[httpx.AsyncClient, Runtime]:
        # jobs=True, or jobs=JobsConfig(...): offer /v1/jobs with an in-process runner (none
        # with JobsConfig(run_in_process=False): jobs stay queued, as with no worker running).
        jobs = overrides.pop("jobs", False)
        if not isinstance(jobs, bool):
            overrides["jobs"] = jobs
        store = overrides.pop("store", None) or MemoryStore()
        tracing = overrides.pop("tracing", None)
        rt = build_runtime(
            make_settings(tmp_path, **overrides),
            store=store,
            validate_job=validate_job if jobs else None,
            tracing=tracing,
        )
        if jobs:
            attach_workers(rt, run_jobs=rt.jobs_options is None or rt.jobs_options.run_in_process)
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


@contextlib.contextmanager
def fresh_database(database_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards), as a URL.

    Created on the server of ``database_url`` as ``hr_test_<random hex>``, from ``template0``
    (which nobody can be connected to, so concurrent creations never collide); the URL keeps
    the credentials and uses ``postgresql+psycopg``. The drop forces out any connection left
    open.
    """
    server = sqlalchemy.make_url(database_url).set(drivername="postgresql+psycopg")
    name = f"hr_test_{uuid.uuid4().hex}"
    admin = _admin_engine(server)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def fresh_database_url(database_url: str | None) -> Iterator[str]:
    """:func:`fresh_database` for this test alone; skips without HEADRACE_TEST_DATABASE_URL."""
    if not database_url:
        pytest.skip("set HEADRACE_TEST_DATABASE_URL to run against PostgreSQL")
    with fresh_database(database_url) as url:
        yield url


def _admin_engine(server: sqlalchemy.URL) -> sqlalchemy.Engine:
    """An AUTOCOMMIT engine on the URL's database, or on ``postgres`` if that one is missing."""
    try:
        return _checked_engine(server)
    except sqlalchemy.exc.OperationalError:
        return _checked_engine(server.set(database="postgres"))


def _checked_engine(url: sqlalchemy.URL) -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool
    )
    try:
        with engine.connect():
            return engine
    except BaseException:
        engine.dispose()
        raise
